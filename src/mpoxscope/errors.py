"""One exception type for every error a user can fix; the CLI prints it as one line."""


class MpoxscopeError(Exception):
    """An error caused by input or configuration, with a message that says what to fix."""


class ImageError(MpoxscopeError):
    """An image file that cannot be read, decoded or converted."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
