"""The redactor's memory of short texts (issue #23) never outlives a new secret."""

from __future__ import annotations

import threading

from exo_remote_engine.contract.redaction import REDACTED, SecretRegistry


def test_a_text_redacted_before_a_secret_was_added_is_redacted_after_it() -> None:
    registry = SecretRegistry()
    text = "provider said: key is xq7Lm2Zp9Rt4 for model bench"
    assert registry.redact(text) == text  # remembered as clean
    registry.add("xq7Lm2Zp9Rt4")
    assert registry.redact(text) == f"provider said: key is {REDACTED} for model bench"
    assert "xq7Lm2Zp9Rt4" not in registry.redact(text)  # and remembered redacted


def test_remembered_answers_equal_fresh_ones() -> None:
    registry = SecretRegistry()
    registry.add("sk-abcdefgh12345678")
    texts = ["OK", "bench", "node-1", "sk-abcdefgh12345678 leaked", "tail 12345678 only", "Bearer abc123def456"]
    fresh = [SecretRegistry._redact(registry, t) for t in texts]
    assert [registry.redact(t) for t in texts] == fresh
    assert [registry.redact(t) for t in texts] == fresh  # second time: from memory
    assert "12345678" not in fresh[3] and "12345678" not in fresh[4]


def test_long_texts_and_extra_values_are_not_remembered() -> None:
    registry = SecretRegistry()
    long = "x" * 600
    registry.redact(long)
    assert long not in registry._cache
    assert registry.redact("call with value-1234", extra=["value-1234"]) == f"call with {REDACTED}"
    assert "call with value-1234" not in registry._cache


def test_memory_is_bounded() -> None:
    registry = SecretRegistry()
    for i in range(10_000):
        registry.redact(f"request_id=r-{i}")
    assert len(registry._cache) <= 4096


def test_adds_racing_redactions_never_leave_a_secret_unredacted() -> None:
    registry = SecretRegistry()
    secrets = [f"Zq{i:04d}secretvalue" for i in range(200)]
    texts = [f"echo {s}" for s in secrets]
    stop = threading.Event()

    def redact_forever() -> None:
        while not stop.is_set():
            for t in texts:
                registry.redact(t)

    threads = [threading.Thread(target=redact_forever) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for s in secrets:
            registry.add(s)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert all(s not in registry.redact(t) for s, t in zip(secrets, texts, strict=True))
