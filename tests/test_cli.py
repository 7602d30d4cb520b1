"""``python -m arrayattn info | check | demo``, each in its own process."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "arrayattn", *args], capture_output=True, text=True, timeout=timeout
    )


def test_info():
    done = run("info")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("arrayattn ")
    assert "backend setting: " in out
    for name in ("cupy", "numba_cuda", "numba", "array_api"):
        assert f"\n{name} " in out, name
    assert "devices:" in out


def test_check_every_op():
    done = run("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "scaled_dot_product_attention#0" in done.stdout
    assert "multi_head_attention#0" in done.stdout
    assert " 0 failed" in done.stdout


def test_check_selected_ops_on_the_reference():
    done = run(
        "check",
        "--op",
        "scaled_dot_product_attention",
        "--op",
        "multi_head_attention",
        "--backend",
        "array_api",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "backend setting 'array_api'" in done.stdout
    rows = [
        line for line in done.stdout.splitlines() if line.startswith(("scaled_dot", "multi_head"))
    ]
    assert rows
    assert all(" array_api " in line and line.rstrip().endswith("ok") for line in rows)


def test_check_unknown_op_fails():
    done = run("check", "--op", "nonexistent")
    assert done.returncode != 0
    assert "nonexistent" in done.stderr


def test_check_bad_backend_fails():
    done = run("check", "--backend", "gpu")
    assert done.returncode != 0
    assert "gpu" in done.stderr


def test_demo():
    done = run("demo")
    assert done.returncode == 0, done.stderr
    assert "scaled_dot_product_attention" in done.stdout
    assert "ran on backend" in done.stdout


@pytest.mark.parametrize("args", [(), ("frobnicate",)])
def test_bad_command_line(args):
    done = run(*args)
    assert done.returncode == 2
    assert "usage" in done.stderr
