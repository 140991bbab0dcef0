"""Servers that span GPUs: tensor/data-parallel sizes reach the vLLM/SGLang command lines and
the GPU set reaches CUDA_VISIBLE_DEVICES; impossible combinations fail in one line naming the keys."""

from __future__ import annotations

import pytest

from grpo_lightning.cli import main
from grpo_lightning.inference.launch import (
    ServerConfig,
    check_gpus_exist,
    check_parallel,
    server_argv,
    server_env,
    server_gpus,
)


def _flags(argv: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(argv, argv[1:], strict=False) if a.startswith("--")}


def test_vllm_and_sglang_get_tensor_and_data_parallel_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    vllm = ServerConfig(backend="vllm", gpu=[0, 1, 2, 3], tensor_parallel_size=2)
    flags = _flags(server_argv(vllm, "M", 8000))
    assert flags["--tensor-parallel-size"] == "2" and flags["--data-parallel-size"] == "2"
    assert server_env(vllm)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    sglang = ServerConfig(backend="sglang", gpu=[4, 5], tensor_parallel_size=2)
    flags = _flags(server_argv(sglang, "M", 8000))
    assert flags["--tp-size"] == "2" and "--dp-size" not in flags
    assert server_env(sglang)["CUDA_VISIBLE_DEVICES"] == "4,5"
    # One index: the first of tp x dp consecutive GPUs.
    one = ServerConfig(backend="sglang", gpu=2, tensor_parallel_size=2, data_parallel_size=2)
    assert server_gpus(one) == [2, 3, 4, 5]
    assert _flags(server_argv(one, "M", 8000))["--dp-size"] == "2"
    # The defaults add nothing to the command line.
    plain = server_argv(ServerConfig(backend="vllm", gpu=0), "M", 8000)
    assert not {"--tensor-parallel-size", "--data-parallel-size"} & set(plain)


def test_gpu_sets_map_through_the_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert server_env(ServerConfig(backend="vllm", gpu=[1, 2], tensor_parallel_size=2))["CUDA_VISIBLE_DEVICES"] == "5,6"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ServerConfig(backend="vllm", gpu=[0, 1, 2], tensor_parallel_size=2),
         "data.server.tensor_parallel_size=2 does not divide the 3 GPUs of data.server.gpu=[0, 1, 2]"),
        (ServerConfig(backend="vllm", gpu=[0, 1, 2, 3], tensor_parallel_size=2, data_parallel_size=1),
         "data.server.tensor_parallel_size=2 x data.server.data_parallel_size=1 = 2 GPUs, but data.server.gpu=[0, 1, 2, 3] lists 4"),
        (ServerConfig(backend="builtin", gpu=[0, 1], tensor_parallel_size=2),
         "data.server.tensor_parallel_size=2 / data.server.data_parallel_size=None: data.server.backend=builtin runs one model"),
        (ServerConfig(backend="vllm", gpu=[0, 0]), "data.server.gpu=[0, 0] must list distinct GPU indices"),
    ],
)
def test_impossible_server_parallelism_is_refused(config: ServerConfig, message: str) -> None:
    with pytest.raises(ValueError) as err:
        check_parallel(config)
    assert str(err.value).startswith(message)


def test_more_gpus_than_exist_is_refused_before_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError) as err:
        check_gpus_exist(ServerConfig(backend="vllm", gpu=1, tensor_parallel_size=2))
    assert str(err.value) == (
        "data.server.gpu=1 with data.server.tensor_parallel_size=2 asks for GPUs [1, 2], but only 2 exist here"
    )


def test_the_cli_refuses_a_bad_gpu_set_in_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fit", "--config", "configs/sat_tiny.yaml", "--trainer.logger.init_args.save_dir", str(tmp_path),
                 "--data.server.backend", "vllm", "--data.server.gpu", "[0, 1, 2]",
                 "--data.server.tensor_parallel_size", "2"])
    assert code == 1
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert line == "error: data.server.tensor_parallel_size=2 does not divide the 3 GPUs of data.server.gpu=[0, 1, 2]"
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing started
