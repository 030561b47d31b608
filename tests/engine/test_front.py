"""engine/front.py's decode room: the front ends' default, and PIE_DECODE_ROOM_PAGES for A/B runs."""
import pytest

from pie_server.engine import front


def test_the_default_room_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(front.ROOM_ENV_VAR, raising=False)
    assert front.decode_room_pages() == front.FRONT_END_DECODE_ROOM_PAGES
    monkeypatch.setenv(front.ROOM_ENV_VAR, "")
    assert front.decode_room_pages() == front.FRONT_END_DECODE_ROOM_PAGES
    monkeypatch.setenv(front.ROOM_ENV_VAR, "16")
    assert front.decode_room_pages() == 16


@pytest.mark.parametrize("raw", ["many", "0", "-4", "2.5", "5000"])
def test_a_bad_room_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(front.ROOM_ENV_VAR, raw)
    with pytest.raises(ValueError, match=front.ROOM_ENV_VAR):
        front.decode_room_pages()
