import json

import pytest

from pocketlm.data.records import Problems, RecordWriter, make, read_records, write_records
from pocketlm.errors import PocketLMError


def test_round_trip_and_defaults(tmp_path):
    p = tmp_path / "a.jsonl"
    n = write_records(p, [make("hello\nworld ✓", "x.txt", episode=3), make("two", "y")])
    assert n == 2
    got = list(read_records([p]))
    assert got[0] == {"text": "hello\nworld ✓", "source": "x.txt", "meta": {"episode": 3}}
    q = tmp_path / "b.jsonl"
    q.write_text('{"text": "bare"}\n')
    assert list(read_records([q])) == [{"text": "bare", "source": str(q), "meta": {}}]


def test_bad_lines_are_counted_with_file_and_line(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{oops\n{"nottext": 1}\n\xff\xfe\n\n{"text": "ok2"}\n')
    problems = Problems()
    assert [r["text"] for r in read_records([p], problems)] == ["ok", "ok2"]
    assert problems.counts == {"malformed JSON": 1, "no text field": 1, "not UTF-8": 1}
    assert f"{p}:2: malformed JSON" in capsys.readouterr().err
    with pytest.raises(PocketLMError, match=r"bad.jsonl:2: malformed JSON"):
        list(read_records([p], Problems(strict=True)))


def test_writer_leaves_nothing_on_error(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text('{"text": "precious"}\n')
    with pytest.raises(RuntimeError):
        with RecordWriter(p) as w:
            w.write(make("new", "s"))
            raise RuntimeError("crash")
    assert json.loads(p.read_text())["text"] == "precious"
    assert [f.name for f in tmp_path.iterdir()] == ["out.jsonl"]
