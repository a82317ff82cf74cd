"""The daemon's persisted record of enrolled containers.

The pinned maps survive a daemon restart, but the facts needed to undo or
rebuild an enrolment do not live in them: which mark key belongs to which
container, which netns and interface it was attached in, and which pod it is.
This module keeps those facts in one JSON file in the state directory
(``--state-dir``, default ``/var/run/merbridge``), written atomically
(temporary file, rename) so that a ``kill -9`` at any moment leaves
either the old or the new file, never half of one.

A record is written *before* the first kernel object of an ADD is created
(``phase="adding"``) and switched to ``"enrolled"`` when the ADD is complete,
so a restarted daemon knows every mark key it may have handed out.

A clean shutdown (SIGTERM) saves the file once more with ``stopped_cleanly``:
it took our plugin out of the CNI config, so pods may start unseen until the
next daemon runs, which then looks for them (``Registry.adopt``). After
``kill -9`` the plugin stays chained and their ADDs are retried instead.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "enrolled.json"
FORMAT_VERSION = 1

ADDING = "adding"
ENROLLED = "enrolled"


@dataclass
class Record:
    """One container enrolled (or being enrolled) by a CNI ADD."""

    container_id: str
    netns: str
    ifname: str
    namespace: str
    name: str
    uid: str = ""
    ips: tuple[str, ...] = ()
    #: key of the pod's entry in mb_mark_pod_ips, and the SO_MARK of its 39807 listener
    key: int = 0
    phase: str = ADDING
    #: (st_dev, st_ino) of the netns file at ADD time: a reused path is not the same pod
    netns_id: tuple[int, int] | None = None
    #: SO_NETNS_COOKIE of the pod netns: its key in mb_netns_pod (0: not known)
    netns_cookie: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        # shallow (asdict deep-copies field by field: ~10x slower, per record per save)
        data = {f.name: getattr(self, f.name) for f in _FIELDS}
        data["extra"] = dict(self.extra)
        data["ips"] = list(self.ips)
        data["netns_id"] = list(self.netns_id) if self.netns_id else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> Record:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["ips"] = tuple(kwargs.get("ips") or ())
        nid = kwargs.get("netns_id")
        kwargs["netns_id"] = tuple(nid) if nid else None
        rec = cls(**kwargs)
        if not isinstance(rec.container_id, str) or not rec.container_id \
                or not isinstance(rec.key, int) or not isinstance(rec.netns_cookie, int):
            raise ValueError(f"bad state record {data!r}")
        return rec


_FIELDS = fields(Record)


class StateStore:
    """The state file in ``state_dir``: load() once at start, save() after each change."""

    def __init__(self, state_dir: str | os.PathLike):
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        #: what the last load() found: the previous daemon stopped cleanly
        self.stopped_cleanly = False
        self._generation = itertools.count(1)   # next() is atomic under the GIL
        self._written = 0
        self._write_lock = threading.Lock()

    def load(self) -> dict[str, Record]:
        """Records by container id; a missing file is an empty state.

        A file that cannot be parsed is moved aside (``.corrupt``) rather than
        trusted or silently overwritten, and the daemon starts empty: the
        reconcile pass then rebuilds what it can from the pod source.
        """
        self.stopped_cleanly = False
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown state format {data.get('version')!r}")
            records = [Record.from_json(r) for r in data.get("containers", [])]
            stopped = data.get("stopped_cleanly") is True
        except (ValueError, TypeError, AttributeError) as exc:
            aside = self.path.with_suffix(".corrupt")
            log.error("state file %s is unreadable (%s); moved to %s", self.path, exc, aside)
            os.replace(self.path, aside)
            return {}
        self.stopped_cleanly = stopped
        return {r.container_id: r for r in records}

    def save(self, records: dict[str, Record], stopped_cleanly: bool = False) -> None:
        """Replace the file atomically (write a temporary file, rename it).

        No fsync: the file must survive the daemon (a crash, kill -9, an
        upgrade), which the page cache already guarantees; what it describes
        (maps, listeners, XDP) does not survive the node, and after a reboot
        every pod is ADDed again anyway (an unreadable file is moved aside,
        see ``load``). Production keeps it on tmpfs (/var/run). Two fsyncs
        per ADD/DEL cost ~10 ms on a disk.
        """
        self.write(self.snapshot(records, stopped_cleanly))

    def snapshot(self, records: dict[str, Record],
                 stopped_cleanly: bool = False) -> tuple[int, str]:
        """``records`` as the file's text, numbered: take it while ``records``
        cannot change, ``write`` it after (the registry's lock is not held
        for the file system). Compact JSON: ``indent`` would switch json to its
        pure-Python encoder, O(pods) on every ADD."""
        data = {"version": FORMAT_VERSION,
                "containers": [records[c].to_json() for c in sorted(records)]}
        if stopped_cleanly:
            data["stopped_cleanly"] = True
        return next(self._generation), json.dumps(data, sort_keys=True, separators=(",", ":"))

    def write(self, snapshot: tuple[int, str]) -> None:
        """Put a ``snapshot`` in place, unless a later one is there already
        (it holds every change this one holds: snapshots are taken in order)."""
        generation, body = snapshot
        with self._write_lock:
            if generation <= self._written:
                return
            try:
                fd, tmp = tempfile.mkstemp(prefix=".enrolled.", dir=self.dir)
            except FileNotFoundError:
                self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd, tmp = tempfile.mkstemp(prefix=".enrolled.", dir=self.dir)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(body)
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
            self._written = generation

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
