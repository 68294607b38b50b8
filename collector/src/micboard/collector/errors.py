"""The collector's exceptions: a branch of :class:`MicboardError` with stable collector codes."""

from __future__ import annotations

from enum import StrEnum

from micboard.shared.errors import ErrorCode, MicboardError


class CollectorErrorCode(StrEnum):
    """Stable codes of collector errors: returned by the API and counted; never renamed once shipped."""

    ALERT_NOT_FOUND = "alert.not_found"
    ALERT_INVALID_TRANSITION = "alert.invalid_transition"
    DEVICE_NOT_FOUND = "device.not_found"
    DEVICE_STILL_REPORTED = "device.still_reported"
    AGENT_NOT_FOUND = "agent.not_found"
    AGENT_STILL_REPORTING = "agent.still_reporting"
    CHANNEL_NOT_FOUND = "device.channel_not_found"
    COMMAND_INVALID = "command.invalid"
    COMMAND_UNAVAILABLE = "command.unavailable"
    WEBHOOK_NOT_FOUND = "webhook.not_found"
    WEBHOOK_INVALID = "webhook.invalid"
    HISTORY_INVALID_QUERY = "history.invalid_query"
    RULES_INVALID = "alert_rules.invalid"
    SCHEMA_NOT_CURRENT = "store.schema_not_current"


class CollectorError(MicboardError):
    """Base of every error the collector raises on purpose."""

    # The shared ErrorCode enum is closed (an enum with members cannot be extended), so collector
    # errors carry their own code enum; both are StrEnums, so callers read ``str(code)`` either way.
    code: ErrorCode | CollectorErrorCode  # type: ignore[assignment]

    def __init__(self, code: CollectorErrorCode, message: str) -> None:
        Exception.__init__(self, message)
        self.code = code
        self.message = message


class AlertNotFoundError(CollectorError):
    """No alert has the given id."""

    def __init__(self, alert_id: int) -> None:
        super().__init__(CollectorErrorCode.ALERT_NOT_FOUND, f"alert {alert_id} does not exist")
        self.alert_id = alert_id


class InvalidTransitionError(CollectorError):
    """An alert cannot move from its current state to the requested one."""

    def __init__(self, alert_id: int, state: str, action: str) -> None:
        super().__init__(
            CollectorErrorCode.ALERT_INVALID_TRANSITION,
            f"alert {alert_id} is {state} and cannot be {action}",
        )
        self.alert_id = alert_id
        self.state = state
        self.action = action


class DeviceNotFoundError(CollectorError):
    """No device is known under the given agent and device key."""

    def __init__(self, agent: str, device_key: str) -> None:
        super().__init__(
            CollectorErrorCode.DEVICE_NOT_FOUND, f"no device {device_key!r} is known on agent {agent!r}"
        )


class DeviceIdNotFoundError(CollectorError):
    """No device has the given id."""

    def __init__(self, device_id: int) -> None:
        super().__init__(CollectorErrorCode.DEVICE_NOT_FOUND, f"device {device_id} does not exist")
        self.device_id = device_id


class DeviceStillReportedError(CollectorError):
    """A device its agent reports online cannot be forgotten: the agent's next snapshot brings it back."""

    def __init__(self, device_id: int, device_key: str, agent: str) -> None:
        super().__init__(
            CollectorErrorCode.DEVICE_STILL_REPORTED,
            f"device {device_id} ({device_key} on agent {agent}) is online: its agent would report it "
            "again within a minute. Take it out of the agent's configuration (or off the network) "
            "first; once it shows offline it can be forgotten",
        )


class AgentNotFoundError(CollectorError):
    """No agent is known under the given name."""

    def __init__(self, agent: str) -> None:
        super().__init__(CollectorErrorCode.AGENT_NOT_FOUND, f"no agent {agent!r} is known")
        self.agent = agent


class AgentStillReportingError(CollectorError):
    """An agent that is heard cannot be forgotten: its next event would bring it back."""

    def __init__(self, agent: str) -> None:
        super().__init__(
            CollectorErrorCode.AGENT_STILL_REPORTING,
            f"agent {agent!r} is online: its next heartbeat would bring it back. Stop it (and revoke "
            "its NATS identity) first; once it shows stale it can be forgotten",
        )
        self.agent = agent


class ChannelNotFoundError(CollectorError):
    """The device exists but has no channel with the given index."""

    def __init__(self, agent: str, device_key: str, channel: int) -> None:
        super().__init__(
            CollectorErrorCode.CHANNEL_NOT_FOUND,
            f"device {device_key!r} on agent {agent!r} has no channel {channel}",
        )


class InvalidCommandError(CollectorError):
    """A command's arguments are refused before anything is sent."""

    def __init__(self, message: str) -> None:
        super().__init__(CollectorErrorCode.COMMAND_INVALID, message)


class CommandUnavailableError(CollectorError):
    """Commands cannot be sent: this collector runs without a NATS connection for them."""

    def __init__(self) -> None:
        super().__init__(
            CollectorErrorCode.COMMAND_UNAVAILABLE, "commands are not available on this collector"
        )


class WebhookNotFoundError(CollectorError):
    """No webhook has the given id."""

    def __init__(self, webhook_id: int) -> None:
        super().__init__(CollectorErrorCode.WEBHOOK_NOT_FOUND, f"webhook {webhook_id} does not exist")


class InvalidWebhookError(CollectorError):
    """A webhook's URL, secret or event filter is refused."""

    def __init__(self, message: str) -> None:
        super().__init__(CollectorErrorCode.WEBHOOK_INVALID, message)


class InvalidHistoryQueryError(CollectorError):
    """A history query's range or resolution is refused."""

    def __init__(self, message: str) -> None:
        super().__init__(CollectorErrorCode.HISTORY_INVALID_QUERY, message)


class InvalidAlertRulesError(CollectorError):
    """Per-site alert thresholds that do not validate."""

    def __init__(self, message: str) -> None:
        super().__init__(CollectorErrorCode.RULES_INVALID, message)


class SchemaNotCurrentError(CollectorError):
    """The database is not at the schema revision of this build (run ``micboard-collector migrate``)."""

    def __init__(self, message: str) -> None:
        super().__init__(CollectorErrorCode.SCHEMA_NOT_CURRENT, message)
