"""Reward models: a registry of Reward factories (name or dotted path)."""

from ..registry import Registry

REWARDS = Registry("reward")
