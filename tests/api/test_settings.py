"""The service's settings from THALI_* variables, and a bad one as a one-line error of thali serve."""

from __future__ import annotations

import pytest
from helpers import thali_in_process

from thali.api.settings import Settings

SECRET = "s3cret-0123456789abcdef"


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THALI_DOMAINS", "south_asian_food@production, plant_disease")
    monkeypatch.setenv("THALI_TRUSTED_KEYS", "/keys/a.pub:/keys/b.pub")
    monkeypatch.setenv("THALI_MAX_UPLOAD_BYTES", "2048")
    monkeypatch.setenv("THALI_ADMIN_KEY", SECRET)
    settings = Settings()
    assert settings.domains == ["south_asian_food@production", "plant_disease"]
    assert settings.trusted_keys == ["/keys/a.pub", "/keys/b.pub"]
    assert settings.max_upload_bytes == 2048 and settings.admin_key.get_secret_value() == SECRET
    assert SECRET not in repr(settings)
    monkeypatch.setenv("THALI_DOMAINS", '["a", "b@3"]')
    assert Settings().domains == ["a", "b@3"]


def test_a_bad_setting_is_one_line() -> None:
    result = thali_in_process("serve", "--max-batch-size", "0", "--registry", "/nonexistent")
    assert result.returncode == 2 and result.stderr.startswith("error: serve: max_batch_size")
    assert "Traceback" not in result.stderr
    result = thali_in_process(
        "serve", "--domain", "../etc", "--registry", "/nonexistent", env={"THALI_WARMUP": "0"}
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
