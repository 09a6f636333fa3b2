import json

import pytest

from herd.engine.errors import Code, HerdError
from herd.platform.batch.input_lines import parse_input, window_s

ENDPOINT = "/v1/chat/completions"


def _line(custom_id="a", method="POST", url=ENDPOINT, body=None, **extra):
    request = {"custom_id": custom_id, "method": method, "url": url, "body": body or {"model": "scout"}, **extra}
    return json.dumps({k: v for k, v in request.items() if v is not ...})


def _refusal(text: str) -> str:
    with pytest.raises(HerdError) as caught:
        parse_input(text.encode(), ENDPOINT)
    assert caught.value.code is Code.INVALID_ARGUMENT
    return caught.value.message


def test_good_lines_are_numbered_among_requests_and_blank_lines_skipped():
    lines = parse_input(f"{_line('a')}\n\n{_line('b')}\r\n".encode(), ENDPOINT)
    assert [(x.index, x.custom_id, x.body) for x in lines] == [(0, "a", {"model": "scout"}),
                                                              (1, "b", {"model": "scout"})]


@pytest.mark.parametrize(("text", "says"), [
    (f"{_line('a')}\nnot json", "line 2: not JSON"),
    ("[1, 2]", "line 1: a request must be a JSON object"),
    (_line(custom_id=...), "line 1: custom_id is missing"),
    (_line(custom_id=""), "line 1: custom_id is missing"),
    (_line(method="GET"), "line 1: method must be"),
    (_line(url="/v1/completions"), "line 1: url '/v1/completions' is not this batch's endpoint"),
    (_line(body=...), "line 1: body must be a JSON object"),
    (f"{_line('x')}\n{_line('y')}\n{_line('x')}", "line 3: custom_id 'x' is also on line 1"),
    (_line(extra=1), "line 1: unknown fields ['extra']"),
    ("\n\n", "no requests"),
])
def test_a_bad_line_is_refused_by_its_number(text, says):
    assert says in _refusal(text)


def test_not_utf8_is_refused():
    with pytest.raises(HerdError, match="not UTF-8"):
        parse_input(b"\xff\xfe", ENDPOINT)


def test_windows():
    assert window_s("24h") == 86400
    with pytest.raises(HerdError, match="completion_window"):
        window_s("1h")
