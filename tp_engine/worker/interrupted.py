"""Raised by a worker's run of decode steps that stopped early because SHUTDOWN came. Its own
module (no torch) so that the worker loop can catch it without importing the model runner."""


class Interrupted(Exception):
    pass
