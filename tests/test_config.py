import subprocess
import sys

import pytest
import yaml

from common.config import CONFIG_ENV, ConfigError, load_config, parse_config

from tests.stackutil import ROOT


def test_embedded_default_is_complete():
    cfg = load_config(None, environ={})
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8080
    assert cfg.default_model in cfg.models
    spec = cfg.models[cfg.default_model]
    assert spec.enabled and spec.path.startswith("tiny:")
    assert {name: prof.max_pixels for name, prof in cfg.profiles.items()} == {
        "fast": 1048576, "balanced": 5720064, "quality": 12845056}


def test_seed_shaped_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"host": "0.0.0.0", "port": 9000, "default_model": "a"},
        "models": {"a": {"path": "/m/a", "enabled": True, "preload": False, "min_pixels": 3136,
                         "max_pixels": 5720064, "max_context_length": 8192},
                   "b": {"path": "microsoft/GUI-Actor-3B-Qwen2.5-VL", "enabled": False}},
        "profiles": {"fast": {"max_pixels": 500000}},
    }))
    cfg = load_config(str(path), environ={})
    assert cfg.default_model == "a"
    assert list(cfg.enabled_models()) == ["a"]
    assert cfg.profiles["fast"].max_pixels == 500000
    assert cfg.profiles["quality"].max_pixels == 12845056  # defaults kept for profiles not given


def test_environment_variable_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 9100}\n")
    assert load_config(None, environ={CONFIG_ENV: str(path)}).server.port == 9100


@pytest.mark.parametrize("raw, key", [
    ({"server": {"port": "eighty"}}, "server.port"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"prot": 8080}}, "prot"),
    ({"models": {"a": {"enabled": True}}}, "models.a.path"),
    ({"models": {"a": {"path": "x", "max_pixels": 100}}}, "models.a.max_pixels"),
    ({"models": {"a": {"path": "x", "dtype": "int3"}}}, "models.a.dtype"),
    ({"models": {"a": {"path": "x", "preload": "yes"}}}, "models.a.preload"),
    ({"models": {"a": {"path": "x", "warmup": ["1920 by 1080"]}}}, "models.a.warmup"),
    ({"models": {"a": {"path": "x", "warmup": ["10x10"]}}}, "models.a.warmup"),
    ({"models": {"a": {"path": "x", "warmup": "1920x1080"}}}, "models.a.warmup"),
    ({"models": {"a": {"path": "x", "screenshot_cache_mb": -1}}}, "models.a.screenshot_cache_mb"),
    ({"models": {"a": {"path": "x", "finishing": 1}}}, "models.a.finishing"),
    ({"models": {"a": {"path": "x", "keep_cpus_awake_ms": -1}}}, "models.a.keep_cpus_awake_ms"),
    ({"models": {"a": {"path": "x", "keep_cpus_awake_ms": 2.5}}}, "models.a.keep_cpus_awake_ms"),
    ({"models": {"a": {"path": "x", "keep_cpus_awake_ms": 100_000}}}, "models.a.keep_cpus_awake_ms"),
    ({"broker": {"memory_budget": -1}}, "broker.memory_budget"),
    ({"broker": {"client_endpoint": "localhost:5"}}, "broker.client_endpoint"),
    ({"server": {"default_model": "nope"}}, "server.default_model"),
    ({"profiles": {"fast": {"max_pixels": "big"}}}, "profiles.fast.max_pixels"),
    ({"surprise": 1}, "surprise"),
    ([1, 2], "top level"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert key in str(err.value)


def test_warmup_sizes_default_to_a_1080p_screen_on_a_gpu_only():
    spec = parse_config({"models": {"a": {"path": "x"}, "b": {"path": "y", "warmup": ["1280x720", "3840x2160"]},
                                    "c": {"path": "z", "warmup": []}},
                         "server": {"default_model": "a"}}).models
    assert spec["a"].warmup_sizes(on_gpu=True) == [(1920, 1080)] and spec["a"].warmup_sizes(on_gpu=False) == []
    assert spec["b"].warmup_sizes(on_gpu=False) == [(1280, 720), (3840, 2160)]
    assert spec["c"].warmup_sizes(on_gpu=True) == []


def test_memory_budget_forms():
    assert parse_config({"broker": {"memory_budget": 0.5}}).broker.memory_budget == 0.5
    assert parse_config({"broker": {"memory_budget": 8_000_000_000}}).broker.memory_budget == 8_000_000_000
    assert parse_config({}).broker.memory_budget == "auto"


@pytest.mark.parametrize("module", ["broker", "workers.supervisor", "frontend"])
def test_processes_exit_2_with_one_line_on_bad_config(tmp_path, module):
    path = tmp_path / "bad.yaml"
    path.write_text("server: {port: nope}\n")
    proc = subprocess.run([sys.executable, "-m", module, "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "server.port" in proc.stderr
    assert "Traceback" not in proc.stderr
