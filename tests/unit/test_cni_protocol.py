"""protocol: the plugin <-> daemon contract round-trips and rejects bad messages."""
from __future__ import annotations

import json

import pytest

from merbridge.cni import protocol
from merbridge.cni.protocol import (AddReply, Attachment, CniRequest, ErrorReply, Interface,
                                    ProtocolError, StatusReply)

FULL = CniRequest(command="ADD", container_id="c1", netns="/var/run/netns/p", ifname="eth0",
                  pod_namespace="default", pod_name="web-0", pod_uid="u-1",
                  ips=("10.244.1.2/24", "fd00::2/64"),
                  interfaces=(Interface("eth0", "/var/run/netns/p"),), cni_version="1.0.0",
                  network="k8s-pod-network")


@pytest.mark.parametrize("req", [
    FULL,
    CniRequest(command="DEL", container_id="c1", ifname="eth0"),
    CniRequest(command="CHECK", container_id="c1", netns="/n", ifname="eth0"),
    CniRequest(command="GC", attachments=(Attachment("c1", "eth0"), Attachment("c2", "net1"))),
    CniRequest(command="GC"),
])
def test_request_round_trip(req):
    data = req.to_json()
    assert CniRequest.from_json(data) == req
    assert CniRequest.from_json(data, req.command) == req
    obj = json.loads(data)
    assert set(obj) == {"command", "container_id", "netns", "ifname", "pod_namespace",
                        "pod_name", "pod_uid", "ips", "interfaces", "cni_version", "network",
                        "attachments"}


@pytest.mark.parametrize("reply", [AddReply(), AddReply({"key": 12345}),
                                   ErrorReply(11, "later", "d"), ErrorReply(103, "x"),
                                   StatusReply(True, "ready"), StatusReply(False, "loading")])
def test_reply_round_trip(reply):
    assert type(reply).from_json(reply.to_json()) == reply


def mutate(**over):
    obj = json.loads(FULL.to_json())
    obj.update(over)
    return json.dumps(obj).encode()


@pytest.mark.parametrize("data", [
    b"", b"[]", b"\xff", b"{" * 5000, b"x" * (protocol.MAX_BODY + 1),
    mutate(command="FROB"), mutate(command=1), mutate(container_id=5),
    mutate(container_id=""), mutate(netns=""), mutate(ifname=None),
    mutate(pod_name="x" * (protocol.MAX_STR + 1)), mutate(netns="/" * (protocol.MAX_PATH + 1)),
    mutate(pod_name="a\0b"),
    mutate(ips="10.0.0.1/8"), mutate(ips=["10.0.0.1"]), mutate(ips=["10.0.0.300/8"]),
    mutate(ips=[5]), mutate(ips=["10.0.0.1/8"] * (protocol.MAX_IPS + 1)),
    mutate(interfaces=[{"name": 1}]), mutate(interfaces=["eth0"]),
    mutate(attachments=[{"container_id": ""}]), mutate(attachments=[["c", "eth0"]]),
])
def test_request_rejects(data):
    with pytest.raises(ProtocolError):
        CniRequest.from_json(data)


def test_request_command_must_match_endpoint():
    with pytest.raises(ProtocolError):
        CniRequest.from_json(FULL.to_json(), "DEL")


def test_unknown_fields_are_ignored():
    assert CniRequest.from_json(mutate(future_field={"x": 1})) == FULL


def test_ips_are_normalized_and_constructor_validates():
    assert protocol.normalize_ip("fd00:0:0::2/64") == "fd00::2/64"
    for unspecified in ("0.0.0.0/0", "::/0", "0.0.0.0/24"):
        with pytest.raises(ProtocolError, match="unspecified"):
            protocol.normalize_ip(unspecified)
    with pytest.raises(ProtocolError):
        CniRequest(command="ADD", container_id="c", netns="/n", ifname="eth0",
                   ips=("fd00:0:0::2/64",))
    with pytest.raises(ProtocolError):
        CniRequest(command="ADD", container_id="c", ifname="eth0")


@pytest.mark.parametrize("data", [b'{"code": "11", "msg": "m"}', b'{"code": true, "msg": "m"}',
                                  b'{"code": 0, "msg": "m"}', b'{"code": 11}'])
def test_error_reply_rejects(data):
    with pytest.raises(ProtocolError):
        ErrorReply.from_json(data)


@pytest.mark.parametrize("data", [b'{"ready": 1}', b'{}', b'{"ready": true, "detail": 3}'])
def test_status_reply_rejects(data):
    with pytest.raises(ProtocolError):
        StatusReply.from_json(data)


def test_paths():
    assert protocol.PATHS == {"ADD": "/v1/cni/add", "DEL": "/v1/cni/del",
                              "CHECK": "/v1/cni/check", "GC": "/v1/cni/gc"}
    assert protocol.STATUS_PATH == "/v1/status"
