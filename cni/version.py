"""CNI spec versions: which we speak, and which commands each allows.

Like Go's ``pkg/version``: the config's ``cniVersion`` must be one we support
(else code 1), CHECK needs >= 0.4.0, and STATUS and GC need >= 1.1.0.
"""
from __future__ import annotations

from merbridge.cni import errors

#: oldest first; the result and error JSON we print carry the config's version
SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT = SUPPORTED[-1]
#: what Go's version decoder assumes when a config has no cniVersion
IMPLICIT = "0.1.0"

#: the first spec version that knows each command
MIN_VERSION = {"ADD": "0.1.0", "DEL": "0.1.0", "CHECK": "0.4.0",
               "GC": "1.1.0", "STATUS": "1.1.0"}


def parse(text: str) -> tuple[int, int, int]:
    """``"1.0.0"`` -> ``(1, 0, 0)``; CniError(DECODING_FAILURE) if malformed."""
    parts = text.split(".") if isinstance(text, str) else []
    if len(parts) != 3 or not all(p.isdigit() and p.isascii() and len(p) <= 6 for p in parts):
        raise errors.CniError(errors.DECODING_FAILURE,
                              f"invalid version {str(text)[:40]!r}: expected MAJOR.MINOR.PATCH")
    return int(parts[0]), int(parts[1]), int(parts[2])


def check(config_version: str, command: str) -> None:
    """Raise the CniError Go's skel raises for this config version and command.

    Like Go's reconciler this is a membership test: a malformed version is
    simply not supported (code 1).
    """
    if config_version not in SUPPORTED:
        raise errors.CniError(
            errors.INCOMPATIBLE_CNI_VERSION, "incompatible CNI versions",
            f'config is "{config_version}", plugin supports {list(SUPPORTED)}')
    minimum = MIN_VERSION.get(command)
    if minimum is not None and parse(config_version) < parse(minimum):
        raise errors.CniError(errors.INCOMPATIBLE_CNI_VERSION,
                              f"config version does not allow {command}",
                              f"{command} needs cniVersion >= {minimum}")


def info() -> dict:
    """The VERSION command's output."""
    return {"cniVersion": CURRENT, "supportedVersions": list(SUPPORTED)}
