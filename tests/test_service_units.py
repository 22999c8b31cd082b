"""The service's pieces without processes: wire formats, share store, auth, the OpenAPI contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from service.api import auth
from service.api.errors import ERRORS
from service.api.transport import wire
from service.mpc.dealer import Dealer, Request
from service.store import ModelRegistry, StoreError, load_share

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "default"
INT64 = st.integers(-(2**63), 2**63 - 1)


@given(st.lists(INT64, min_size=0, max_size=40))
def test_tensor_json_round_trip(values):
    t = torch.tensor(values, dtype=torch.int64).reshape(len(values), 1)
    obj = wire.tensor_to_json(t)
    assert torch.equal(wire.tensor_from_json(obj["dtype"], obj["shape"], obj["data"]), t)


def test_tensor_json_matches_the_client_byte_for_byte():
    from clients import privdigit

    t = torch.tensor([[0, 1, -1, 2**63 - 1, -(2**63)]], dtype=torch.int64)
    ours = wire.tensor_to_json(t)
    theirs = privdigit.encode_tensor(t.numpy())
    assert ours == theirs
    assert (privdigit.decode_tensor(ours) == t.numpy()).all()


@pytest.mark.parametrize(
    ("dtype", "shape", "data", "needle"),
    [
        ("float32", [1], "AAAAAAAAAAA=", "dtype"),
        ("int64", [2], "AAAAAAAAAAA=", "needs 16"),
        ("int64", [1], "not base64!", "base64"),
        ("int64", [-1], "", "must be in"),
    ],
)
def test_tensor_json_refuses_garbage(dtype, shape, data, needle):
    with pytest.raises(wire.WireError, match=needle):
        wire.tensor_from_json(dtype, shape, data)


def test_peer_frames_round_trip_and_refuse_truncation():
    ts = [torch.arange(6, dtype=torch.int64).reshape(2, 3) - 3, torch.tensor([2**63 - 1])]
    frame = wire.decode_frame(wire.encode_data("rid-1", 7, ts))
    assert (frame.kind, frame.request_id, frame.round) == (wire.DATA, "rid-1", 7)
    assert all(torch.equal(a, b) for a, b in zip(frame.tensors, ts, strict=True))
    meta = wire.decode_frame(wire.encode_json(wire.ARRIVED, "r", {"shape": [1, 1, 28, 28]}))
    assert (meta.kind, meta.payload) == (wire.ARRIVED, {"shape": [1, 1, 28, 28]})
    with pytest.raises(wire.WireError):
        wire.decode_frame(wire.encode_data("rid-1", 7, ts)[:-3])
    with pytest.raises(wire.WireError):
        wire.decode_frame(b"\x09\x00\x00")


def test_peer_messages_keep_their_bytes_round_trip_and_name_what_is_wrong():
    from service.api.transport import messages as m

    batch = {"version": "v1", "output": "label", "requests": [["r", 2]], "open_weights": True,
             "material": "m", "slot": 1, "lane": False}  # fmt: skip
    cases = [
        (
            m.Arrived([1, 1, 28, 28], "label", None),
            {"shape": [1, 1, 28, 28], "output": "label", "want": None},
        ),
        (m.Withdraw(), {}),
        (m.Reject("share_mismatch", "differ"), {"code": "share_mismatch", "message": "differ"}),
        (m.Abort("peer_error", "refused"), {"code": "peer_error", "message": "refused"}),
        (m.Batch("v1", "label", (("r", 2),), True, "m", 1, False), batch),
        (m.Prefetch("v1"), {"version": "v1"}),
        (m.Prefetch("v1", 4), {"version": "v1", "batch": 4}),
        (m.Discard(("a", "b")), {"ids": ["a", "b"]}),
        (m.LanesAt(9000), {"port": 9000}),
    ]
    for message, payload in cases:  # the bytes the dict-built frames had, and back
        frame = m.encode("rid", message)
        assert frame == wire.encode_json(message.KIND, "rid", payload)
        assert m.decode(wire.decode_frame(frame)) == message
    bad = [
        (wire.BATCH, {**batch, "slot": True}, "slot"),
        (wire.BATCH, {**batch, "requests": [["r", "2"]]}, "requests"),
        (wire.BATCH, [1], "not a JSON object"),
        (wire.PREFETCH, {"version": "v1", "batch": None}, "batch"),
        (wire.DISCARD, {"ids": "a"}, "ids"),
        (wire.LANES, {"port": 0}, "port"),
        (wire.ARRIVED, {"shape": [1]}, "ARRIVED fields"),
        (wire.DATA, {}, "not a control message"),
    ]
    for kind, payload, named in bad:
        with pytest.raises(m.BadMessage, match=named):
            m.decode(wire.Frame(kind, "r", payload=payload))


def test_dealer_material_survives_the_wire():
    plan = (Request.beaver("matmul", (2, 3), (3, 4)), Request.and_((5,)), Request.trunc((2,), 16))
    dealer = Dealer()
    for party in (0, 1):
        m = dealer.deal("wire-test-request", party, plan)
        back = wire.material_from_bytes(wire.material_to_bytes(m), m.request_id, party, plan)
        assert back.seed == m.seed
        assert all(torch.equal(a, b) for a, b in zip(back.corrections, m.corrections, strict=True))
        with pytest.raises(wire.WireError):
            wire.material_from_bytes(wire.material_to_bytes(m) + b"x", m.request_id, party, plan)
    assert wire.plan_from_json(json.loads(json.dumps(wire.plan_to_json(plan)))) == plan


def test_auth_macs_bind_every_part_and_verify_with_compare_digest(monkeypatch):
    """Every part of a MAC counts, and each check of a tag goes through `hmac.compare_digest`
    (constant-time in the tag's content; how long a check takes is not measured here)."""
    compared = []
    compare_digest = auth.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    s = b"s" * 32
    tag = auth.mac(s, "peer", "0", "n1", "n2")
    auth.verify(s, tag, "peer", "0", "n1", "n2")
    for parts in (("peer", "1", "n1", "n2"), ("peer", "0", "n1n", "2")):
        with pytest.raises(auth.AuthError):
            auth.verify(s, tag, *parts)
    with pytest.raises(auth.AuthError):
        auth.verify(b"t" * 32, tag, "peer", "0", "n1", "n2")
    assert len(compared) == 4 and all(tag in pair for pair in compared)
    with pytest.raises(auth.AuthError):
        auth.verify(s, None, "peer")


# -- the share store -----------------------------------------------------------------------------


def test_bundled_model_loads_for_both_parties():
    m0, m1 = load_share(DEFAULT_MODEL, 0), load_share(DEFAULT_MODEL, 1)
    assert m0.version == m1.version
    assert m0.network.input_shape == (1, 28, 28)
    assert set(m0.weights) == set(m0.network.weight_names())


def _copy(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, d)
    return d


def test_tampered_share_is_refused(tmp_path):
    d = _copy(tmp_path)
    data = bytearray((d / "share-0.safetensors").read_bytes())
    data[-1] ^= 1
    (d / "share-0.safetensors").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="commitment"):
        load_share(d, 0)
    load_share(d, 1)  # the other party's share is untouched


def test_half_written_share_and_missing_manifest_are_refused(tmp_path):
    d = _copy(tmp_path)
    (d / "share-1.safetensors").write_bytes((d / "share-1.safetensors").read_bytes()[:1000])
    with pytest.raises(StoreError):
        load_share(d, 1)
    (d / "manifest.json").unlink()
    with pytest.raises(StoreError, match="python -m training"):
        load_share(d, 0)


def test_share_of_the_other_party_is_refused(tmp_path):
    d = _copy(tmp_path)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["shares"][0]["file"] = "share-1.safetensors"
    manifest["shares"][0]["sha256"] = manifest["shares"][1]["sha256"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="party 1's share"):
        load_share(d, 0)


def test_registry_keeps_old_version_when_reload_is_refused(tmp_path):
    from training.export import resplit

    d = _copy(tmp_path)
    reg = ModelRegistry(d, 0)
    assert reg.reload() and not reg.reload()
    first = reg.latest.version
    new_version = resplit(d)["model_version"]
    assert reg.changed_on_disk() and reg.reload()
    assert reg.versions() == [new_version, first]
    assert reg.newest_common([first]).version == first
    (d / "share-0.safetensors").write_bytes(b"garbage")
    with pytest.raises(StoreError):
        reg.reload()
    assert reg.latest.version == new_version and reg.last_error


# -- the contract --------------------------------------------------------------------------------


def test_openapi_yaml_is_what_the_app_serves():
    from service.__main__ import OPENAPI_FILE, openapi_text

    assert yaml.safe_load(OPENAPI_FILE.read_text()) == yaml.safe_load(openapi_text()), (
        "openapi.yaml is stale: run `python -m service openapi --write`"
    )


def test_openapi_documents_every_error_code_of_predict():
    doc = yaml.safe_load((REPO / "openapi.yaml").read_text())
    responses = doc["paths"]["/v1/predict"]["post"]["responses"]
    text = json.dumps(responses)
    for code in ("bad_tensor", "replayed_request", "batch_too_large", "peer_timeout", "busy"):
        assert f"`{code}`" in text
        assert str(ERRORS[code][0]) in responses


# -- the command line ----------------------------------------------------------------------------


def _run_cli(args, monkeypatch, capsys, env):
    import os

    from service.__main__ import main

    for key in [k for k in os.environ if k.startswith("PRIVDIGIT_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


REPLICA_KEYS = {"PRIVDIGIT_PEER_SECRET": "p" * 32, "PRIVDIGIT_DEALER_SECRET": "d" * 32}
DEALER_KEYS = {"PRIVDIGIT_PARTY0_SECRET": "0" * 32, "PRIVDIGIT_PARTY1_SECRET": "1" * 32}


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (("replica", "--party", "0", "--model", "models/default"), {}, "peer_secret missing"),
        (
            ("replica", "--party", "0", "--model", "/nonexistent", "--allow-http"),
            REPLICA_KEYS,
            "manifest.json not found",
        ),
        (("replica", "--model", "models/default"), REPLICA_KEYS, "party"),
        (("dealer",), {**DEALER_KEYS, "PRIVDIGIT_PARTY1_SECRET": "short"}, "at least 32"),
        (("dealer",), {"PRIVDIGIT_PARTY0_SECRET": "0" * 32}, "party1_secret missing"),
        # one value for two credentials brings back the one-secret hole: refused
        (("dealer",), {**DEALER_KEYS, "PRIVDIGIT_PARTY1_SECRET": "0" * 32}, "its own credential"),
        (
            ("replica", "--party", "1", "--model", "models/default"),
            {**REPLICA_KEYS, "PRIVDIGIT_DEALER_SECRET": "p" * 32},
            "its own credential",
        ),
        # the old shared deployment secret is refused with a message saying what to do instead
        (("dealer",), {**DEALER_KEYS, "PRIVDIGIT_SECRET": "k" * 32}, "service certs"),
        (("replica", "--party", "0", "--model", "m", "--secret", "k" * 32), {}, "no longer"),
        (("dealer", "--credentials", "/nonexistent"), {}, "not found"),
        (("up", "--ports", "1,2"), {}, "three"),
        (("up", "--model", "/nonexistent"), {}, "python -m training"),
        (("up", "--pairs", "0"), {}, "between 1 and 16"),
        (("up", "--pairs", "2", "--tls"), {}, "one pair"),
        (("web", "--replicas", "http://a:1"), {}, "two URLs"),
        (("web", "--replicas", "http://a:1,http://b:2;ftp://c,http://d"), {}, "two URLs"),
        (("dealer",), DEALER_KEYS, "--allow-http"),
        (("dealer", "--tls-cert", "/nonexistent"), DEALER_KEYS, "together"),
        (("reload", "http://127.0.0.1:9"), {}, "admin key"),
    ],
)
def test_cli_errors_are_one_line_with_nonzero_exit(args, env, needle, monkeypatch, capsys):
    code, _, err = _run_cli(args, monkeypatch, capsys, env)
    assert code == 2, err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("cmd", [(), ("up",), ("replica",), ("dealer",), ("demo",), ("openapi",)])
def test_cli_help(cmd, monkeypatch, capsys):
    code, out, _ = _run_cli((*cmd, "--help"), monkeypatch, capsys, {})
    assert code == 0 and "usage" in out


def test_dev_certs_keep_private_keys_private_and_name_each_role(tmp_path):
    import stat

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from service.devcerts import make_dev_certs
    from service.identity import ROLES, make_credentials

    d = make_dev_certs(tmp_path / "certs", ("replica-1",))
    make_credentials(d)
    private = [d / "ca-key.pem", *d.glob("*/key.pem"), *d.glob("*/*.key")]
    assert len(private) == 1 + 4 + 8
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for role in ROLES:
        cert = x509.load_pem_x509_certificate((d / role / "cert.pem").read_bytes())
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == role
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "replica-1" in names.get_values_for_type(x509.DNSName)


def test_replay_guard_refuses_seen_ids_and_stays_bounded():
    from service.api.errors import ApiError
    from service.api.replay import ReplayGuard

    guard = ReplayGuard(capacity=3)
    for rid in ("a", "b", "c"):
        guard.claim(rid)
    with pytest.raises(ApiError) as info:
        guard.claim("b")
    assert info.value.code == "replayed_request"
    guard.claim("d")  # the oldest id ("a") leaves the window; memory stays bounded
    assert len(guard._seen) == 3


def test_replay_guard_remembers_ids_for_its_window_then_forgets_them():
    """Client ids carry no time: the guard times them. Within the window an id is refused; after
    it the id is forgotten (and may run again, on a fresh run id); memory holds one window."""
    from service.api.errors import ApiError
    from service.api.replay import ReplayGuard

    now = [0.0]
    guard = ReplayGuard(capacity=1_000_000, window_s=600, clock=lambda: now[0])
    guard.claim("first")
    now[0] = 599.9
    with pytest.raises(ApiError) as info:
        guard.claim("first")
    assert info.value.code == "replayed_request"
    for k in range(1000):  # 1000 ids over the next 1000 s: at most one window's worth is kept
        now[0] = 600 + k
        guard.claim(f"id-{k}")
        assert len(guard) <= 601
    guard.claim("first")  # long forgotten
    with pytest.raises(ApiError):
        guard.claim("id-999")


def test_settings_never_print_secrets():
    from service.api.settings import ReplicaSettings

    keys = {"peer_secret": "p" * 40, "dealer_secret": "d" * 40, "admin_secret": "a" * 40}
    s = ReplicaSettings(party=0, model=Path("."), api_keys=["key-xyz"], **keys)
    assert not any(v in repr(s) for v in keys.values()) and "key-xyz" not in repr(s)
    assert s.cors_origins == []  # no browser origin is allowed unless configured


def test_material_pool_keeps_the_usual_run_ready_and_serves_each_entry_once():
    import threading
    from types import SimpleNamespace

    from service.api.batching.prefetch import MaterialPool

    gate = threading.Event()

    def fetch(material_id, model, batch, output):
        gate.wait(5)
        if material_id == "broken":
            raise RuntimeError("dealer down")
        return f"material for {material_id}"

    v1, v2 = SimpleNamespace(version="v1"), SimpleNamespace(version="v2")
    pool = MaterialPool(fetch, depth=3)
    assert pool.missing(v1) == 3
    for material_id in ("broken", "a", "b"):
        pool.add(material_id, v1, 1, "label")
    assert pool.missing(v1) == 0
    assert pool.claim(v1, 1, "label") is None  # nothing fetched yet: never offered early
    gate.set()
    pool.add("wait", v1, 1, "label")
    pool.take("wait").future.result(5)  # one thread fetches in order: the others are done
    assert pool.claim(v1, 1, "label") == "a"  # "broken" failed: it is skipped
    assert pool.claim(v1, 4, "label") is None and pool.claim(v1, 1, "logits") is None
    assert pool.claim(v1, 1, "label") == "b"  # "a" is promised to one run only
    entry = pool.take("a")
    assert entry.future.result() == "material for a" and pool.take("a") is None  # used once
    assert pool.take("b").material_id == "b"
    assert pool.missing(v2) == 3 and len(pool) == 0  # v1's leftovers dropped for v2
    pool.add("c", v2, 1, "label")
    pool.clear()
    assert len(pool) == 0
    pool.close()


def test_material_pool_keeps_entries_ahead_for_the_load_and_drops_a_restarted_dealers():
    from types import SimpleNamespace

    from service.api.batching.prefetch import MaterialPool

    def fetch(material_id, model, batch, output):
        return SimpleNamespace(dealer=b"old" if material_id.startswith("old") else b"new")

    v1 = SimpleNamespace(version="v1")
    pool = MaterialPool(fetch, depth=2)
    assert pool.ahead(v1, 16, 1) == 1
    pool.add("old-16", v1, 16, "label")
    pool.add("old-1", v1, 1, "label")
    pool.take("old-1").future.result(5)
    pool.add("old-1b", v1, 1, "label")
    assert pool.ahead(v1, 16, 1) == 0
    pool.take("old-16").future.result(5)
    pool.add("old-16", v1, 16, "label")  # (taken above to wait for it; back in the pool)
    pool.add("sync", v1, 1, "label")
    pool.take("sync").future.result(5)
    # a batch of 20 queued images runs 16 of them on the entry ahead; 15 images find none
    assert pool.ready_batch(v1, 20, "label") == 16 and pool.ready_batch(v1, 15, "label") == 1
    assert pool.ready_batch(v1, 20, "logits") is None
    assert pool.ahead(v1, 8, 1) == 1  # the load changed: the 16-image entry is dropped
    assert pool.ready_batch(v1, 20, "label") == 1
    pool.add("new-8", v1, 8, "label")
    pool.add("sync2", v1, 1, "label")
    pool.take("sync2").future.result(5)
    pool.forget_other_dealers(b"new")  # the dealer restarted: only its material still fits
    assert pool.ready_batch(v1, 20, "label") == 8 and len(pool) == 1
    pool.close()


def test_the_service_processes_keep_freed_memory_for_reuse():
    import platform

    from service.memory import keep_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt thresholds are glibc's")
    assert keep_freed_memory() is True
