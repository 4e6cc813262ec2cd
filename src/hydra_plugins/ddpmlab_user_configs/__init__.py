"""Hydra finds the user's own configs before ddpmlab's shipped ones.

A ``conf/`` folder in the working directory (or the folder ``$DDPMLAB_CONFIG_DIR`` names) is put first on the
config search path of ddpmlab's entry points, so ``conf/experiment/mine.yaml`` is ``python train.py
experiment=mine``, and a file there with the name of a shipped one (``conf/model/unet_small.yaml``) replaces it.
Other Hydra applications in the same environment are left alone. Hydra imports every module under
``hydra_plugins`` when it scans for plugins, so this one imports nothing but Hydra's base class."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

ENV = "DDPMLAB_CONFIG_DIR"


class DdpmlabUserConfigs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        shipped = any(
            e.provider == "main" and (e.path or "").rstrip("/").endswith(os.path.join("ddpmlab", "conf"))
            for e in search_path.get_path()
        )
        if not shipped:  # another application's entry point
            return
        given = os.environ.get(ENV)
        folder = Path(given).expanduser() if given else Path("conf")
        if given and not folder.is_dir():
            raise ValueError(f"{ENV}={given} is not a folder; point it at your configs or unset it")
        if folder.is_dir():
            search_path.prepend(provider="ddpmlab-user", path=f"file://{folder.resolve()}")
