"""A plugin module that registers nothing (a misnamed module, a forgotten call)."""

ANSWER = 42
