"""Receiver drivers, one package per protocol family, each next to its simulator."""
