"""Groups the user arranges (operators write them) and API tokens (admins manage them)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from micboard.collector.api.auth import Role, TokenRecord
from micboard.collector.api.context import context_of
from micboard.collector.api.errors import ApiError, ApiErrorCode
from micboard.collector.api.models import (
    GroupBody,
    GroupItem,
    GroupPage,
    NoBody,
    NoQuery,
    PageQuery,
    SessionInfo,
    SiteName,
    TokenCreate,
    TokenCreated,
    TokenPage,
)
from micboard.collector.api.routing import Call, RouteTable

routes = RouteTable()


class GroupQuery(PageQuery):
    """Filters of the group listing."""

    site: Annotated[SiteName | None, Field(description="only groups of this site")] = None


def _group_not_found(group_id: int) -> ApiError:
    return ApiError(404, ApiErrorCode.GROUP_NOT_FOUND, f"group {group_id} does not exist")


@routes.route(
    "GET",
    "/api/v1/groups",
    summary="Channel groups, by position",
    role=Role.VIEWER,
    query=GroupQuery,
    body=NoBody,
    response=GroupPage,
    tag="groups",
)
async def list_groups(call: Call[GroupQuery, NoBody]) -> GroupPage:
    """Groups in the order the user arranged them."""
    q = call.query
    found, total = await context_of(call.app).groups.list_groups(limit=q.limit, offset=q.offset, site=q.site)
    return GroupPage.model_validate(
        {"items": [g.to_dict() for g in found], "total": total, "limit": q.limit, "offset": q.offset}
    )


@routes.route(
    "POST",
    "/api/v1/groups",
    summary="Create a channel group",
    role=Role.OPERATOR,
    query=NoQuery,
    body=GroupBody,
    response=GroupItem,
    status=201,
    tag="groups",
)
async def create_group(call: Call[NoQuery, GroupBody]) -> GroupItem:
    """Store a new group."""
    b = call.body
    group = await context_of(call.app).groups.create(
        b.name, b.site, [c.model_dump() for c in b.channels], b.position
    )
    return GroupItem.model_validate(group.to_dict())


@routes.route(
    "PUT",
    "/api/v1/groups/{id}",
    summary="Replace a channel group",
    role=Role.OPERATOR,
    query=NoQuery,
    body=GroupBody,
    response=GroupItem,
    tag="groups",
)
async def replace_group(call: Call[NoQuery, GroupBody]) -> GroupItem:
    """Replace a group's name, site, channels and position."""
    b = call.body
    group = await context_of(call.app).groups.replace(
        call.path["id"], b.name, b.site, [c.model_dump() for c in b.channels], b.position
    )
    if group is None:
        raise _group_not_found(call.path["id"])
    return GroupItem.model_validate(group.to_dict())


@routes.route(
    "DELETE",
    "/api/v1/groups/{id}",
    summary="Delete a channel group",
    role=Role.OPERATOR,
    query=NoQuery,
    body=NoBody,
    response=None,
    status=204,
    tag="groups",
)
async def delete_group(call: Call[NoQuery, NoBody]) -> None:
    """Delete a group."""
    if not await context_of(call.app).groups.delete(call.path["id"]):
        raise _group_not_found(call.path["id"])


def _token_item(record: TokenRecord) -> dict[str, object]:
    return {
        "id": record.id,
        "name": record.name,
        "role": record.role.value,
        "created_ms": record.created_ms,
        "last_used_ms": record.last_used_ms,
        "revoked": record.revoked,
    }


@routes.route(
    "GET",
    "/api/v1/tokens",
    summary="API tokens (without their secrets)",
    role=Role.ADMIN,
    query=PageQuery,
    body=NoBody,
    response=TokenPage,
    tag="tokens",
)
async def list_tokens(call: Call[PageQuery, NoBody]) -> TokenPage:
    """Every token, oldest first."""
    q = call.query
    records = await context_of(call.app).tokens.list_tokens()
    page = records[q.offset : q.offset + q.limit]
    return TokenPage.model_validate(
        {"items": [_token_item(r) for r in page], "total": len(records), "limit": q.limit, "offset": q.offset}
    )


@routes.route(
    "POST",
    "/api/v1/tokens",
    summary="Create an API token (shown once)",
    role=Role.ADMIN,
    query=NoQuery,
    body=TokenCreate,
    response=TokenCreated,
    status=201,
    tag="tokens",
)
async def create_token(call: Call[NoQuery, TokenCreate]) -> TokenCreated:
    """Create a token; the response is the only place its secret ever appears."""
    record, secret = await context_of(call.app).tokens.create(call.body.name, Role(call.body.role))
    return TokenCreated.model_validate({**_token_item(record), "token": secret})


@routes.route(
    "DELETE",
    "/api/v1/tokens/{id}",
    summary="Revoke an API token",
    role=Role.ADMIN,
    query=NoQuery,
    body=NoBody,
    response=None,
    status=204,
    tag="tokens",
)
async def revoke_token(call: Call[NoQuery, NoBody]) -> None:
    """Revoke a token at once (in this process; within seconds in others)."""
    if not await context_of(call.app).tokens.revoke(call.path["id"]):
        raise ApiError(404, ApiErrorCode.TOKEN_NOT_FOUND, f"token {call.path['id']} does not exist")


@routes.route(
    "GET",
    "/api/v1/session",
    summary="The calling token: its id, name and role",
    role=Role.VIEWER,
    query=NoQuery,
    body=NoBody,
    response=SessionInfo,
    tag="tokens",
)
async def session(call: Call[NoQuery, NoBody]) -> SessionInfo:
    """Who is calling: a client offers only what the token's role allows (the API enforces it anyway)."""
    principal = call.principal
    assert principal is not None, "a route that needs a role has a principal"
    return SessionInfo(token_id=principal.token_id, name=principal.name, role=principal.role.value)
