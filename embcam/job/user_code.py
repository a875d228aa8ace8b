"""User code for the explain job (``--model package.module:factory``): shipped to every
Ray worker through Ray's runtime environment (``py_modules``, ``working_dir``), and made
importable on the driver for its fail-fast model build only. Data never names code.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from ..data.locations import has_scheme
from ..models import BUILTIN_SOURCES

if TYPE_CHECKING:
    from .pipeline import ExplainConfig

SUBMITTED_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job


def runtime_env(cfg: ExplainConfig) -> dict:
    """Ray's ``runtime_env`` for the user code named by ``--py-modules`` / ``--working-dir``.
    Refused, in one line, where Ray would not ship it: to a Ray this process already
    joined (a job's runtime_env is fixed by its ``ray.init``), or when a submitted job
    already has the same field (Ray refuses to merge them)."""
    import ray

    env = {}
    if cfg.py_modules:
        env["py_modules"] = [os.path.abspath(path) for path in cfg.py_modules]
    if cfg.working_dir:
        env["working_dir"] = os.path.abspath(cfg.working_dir)
    submitted = json.loads(os.environ.get(SUBMITTED_JOB_CONFIG) or "{}").get("runtime_env") or {}
    for key in sorted(set(env) & set(submitted)):
        raise ValueError(f"--{key.replace('_', '-')}: this job was submitted with its own {key} "
                         "(ray job submit), which Ray does not merge with another: name it in one place only")
    if env and ray.is_initialized():
        raise ValueError("--py-modules/--working-dir: Ray is already initialised in this process, so they "
                         "cannot reach its workers: pass them to your own ray.init(runtime_env=...) instead")
    return env


class NamedModules(importlib.abc.MetaPathFinder):
    """Finds exactly the top-level modules that ``--py-modules`` names (a package folder
    or a .py file), and nothing else in the folders that hold them."""

    def __init__(self, paths: list[str]):
        self.folders = {}
        for path in paths:
            path = os.path.abspath(path).rstrip(os.sep)
            name = os.path.basename(path)
            self.folders[name[:-3] if name.endswith(".py") else name] = os.path.dirname(path)

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        return None if folder is None else importlib.machinery.PathFinder.find_spec(fullname, [folder])


@contextlib.contextmanager
def importable(py_modules: list[str] | None, working_dir: str | None):
    """The user code importable in this process for the block, as Ray makes it on every
    worker: each ``py_modules`` entry by its name, the ``working_dir`` on the path."""
    finder = NamedModules(py_modules or [])
    sys.meta_path.insert(0, finder)
    folder = os.path.abspath(working_dir) if working_dir else None
    if folder:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        if folder:
            sys.path.remove(folder)


def missing_user_module(spec: str | None) -> str | None:
    """The top-level module of a ``package.module:factory`` spec when it cannot be found
    (found, not imported: importing is the model loader's job)."""
    source = (spec or "").partition(":")[0]
    if not source or ":" not in spec or source in (*BUILTIN_SOURCES, "torchscript"):
        return None
    top = source.split(".")[0]
    return top if importlib.util.find_spec(top) is None else None


def with_absolute_paths(cfg: ExplainConfig) -> ExplainConfig:
    """``cfg`` with every local path made absolute against this process's cwd."""
    def local(path):
        return path if path is None or has_scheme(path) else os.path.abspath(os.path.expanduser(path))

    prefixes = None if cfg.allowed_prefixes is None else [local(p) for p in cfg.allowed_prefixes]
    return replace(cfg, manifest=local(cfg.manifest), out=local(cfg.out), image_root=local(cfg.image_root),
                   checkpoint=local(cfg.checkpoint), proxies=local(cfg.proxies), allowed_prefixes=prefixes,
                   py_modules=[local(p) for p in cfg.py_modules or []] or None, working_dir=local(cfg.working_dir))
