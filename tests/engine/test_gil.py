import sys

import pytest

from pie_server.engine import gil


@pytest.fixture(autouse=True)
def _restore_switch_interval():
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_the_server_sets_half_a_millisecond_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(gil.ENV_VAR, raising=False)
    gil.set_server_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(0.0005)


def test_the_engine_core_keeps_pythons_default_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(gil.ENV_VAR, raising=False)
    gil.set_server_switch_interval(gil.CORE_SWITCH_INTERVAL_S)
    assert sys.getswitchinterval() == pytest.approx(0.005)
    monkeypatch.setenv(gil.ENV_VAR, "0.5")
    gil.set_server_switch_interval(gil.CORE_SWITCH_INTERVAL_S)
    assert sys.getswitchinterval() == pytest.approx(0.0005)


def test_the_environment_overrides_it_in_milliseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gil.ENV_VAR, "5")
    gil.set_server_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(0.005)


@pytest.mark.parametrize("raw", ["fast", "0", "-1", "5000"])
def test_a_bad_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(gil.ENV_VAR, raw)
    with pytest.raises(ValueError, match=gil.ENV_VAR):
        gil.set_server_switch_interval()


def test_pie_serve_reports_a_bad_value_and_exits_2(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pie_server.app.cli import main

    monkeypatch.setenv(gil.ENV_VAR, "fast")
    assert main(["serve", "--port", "1"]) == 2
    assert gil.ENV_VAR in capsys.readouterr().out
