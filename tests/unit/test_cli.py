"""`herd make-tiny`, `herd quantize` and `herd generate`, as a user runs them."""

from __future__ import annotations

import torch

from herd.cli import main
from herd.model import load_config
from herd.model.eagle3 import load_eagle3


def test_make_tiny_then_generate(tmp_path, capsys):
    assert main(["make-tiny", "--preset", "maverick", "--out", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert "wrote tiny maverick checkpoint" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "m"), "--chat", "hello", "--max-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "generated" in captured.err and "prompt tokens" in captured.err


def test_generate_is_deterministic(tmp_path, capsys):
    main(["make-tiny", "--out", str(tmp_path / "s")])
    capsys.readouterr()
    outputs = []
    for _ in range(2):
        main(["generate", "--model", str(tmp_path / "s"), "--prompt", "the herd", "--max-tokens", "8"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "absent"), "--prompt", "x"]) == 2
    assert "no tokenizer file" in capsys.readouterr().err


def test_quantize_then_generate(tmp_path, capsys):
    main(["make-tiny", "--out", str(tmp_path / "s")])
    assert main(["quantize", "--int4", str(tmp_path / "s"), str(tmp_path / "q")]) == 0
    assert "wrote int4 checkpoint" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "q"), "--prompt", "the herd", "--max-tokens", "4"]) == 0
    assert "generated" in capsys.readouterr().err
    assert main(["quantize", "--fp8", str(tmp_path / "q"), str(tmp_path / "again")]) == 2
    assert "already quantised" in capsys.readouterr().err


def test_make_tiny_eagle3_writes_a_head_that_loads(tmp_path, capsys):
    assert main(["make-tiny", "--preset", "maverick", "--out", str(tmp_path / "m"), "--eagle3", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert f"wrote tiny EAGLE-3 draft head to {tmp_path / 'm' / 'eagle3'}" in out
    head = load_eagle3(tmp_path / "m" / "eagle3", load_config(tmp_path / "m").text, dtype=torch.float32)
    assert head.fc.weight.shape == (128, 3 * 128) and head.lm_head.weight.shape[0] == 64


def test_serve_takes_the_trunks_of_each_replica(capsys):
    """`herd serve --trunks 2` puts them in the replica's args (and its trunk bundle's count) as a settings file
    would; a transport that cannot carry them is refused before anything starts."""
    assert main(["serve", "--model", "scout", "--shards", "2", "--trunks", "2", "--transport", "collective",
                 "--print-config", "--no-auth"]) == 0
    printed = capsys.readouterr().out
    assert "trunks: 2" in printed
    assert main(["serve", "--model", "scout", "--trunks", "2", "--transport", "grpc", "--print-config",
                 "--no-auth"]) == 2
    assert "trunks > 1 needs expert shard processes over the collective transport" in capsys.readouterr().err


def test_serve_context_parallel_shares_the_global_kv_over_every_trunk(capsys):
    assert main(["serve", "--model", "scout", "--shards", "2", "--trunks", "2", "--transport", "collective",
                 "--context-parallel", "--print-config", "--no-auth"]) == 0
    assert "context_parallel: 2" in capsys.readouterr().out
    assert main(["serve", "--model", "scout", "--context-parallel", "--print-config", "--no-auth"]) == 2
    assert "give --trunks 2 or more" in capsys.readouterr().err
