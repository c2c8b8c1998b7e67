"""Build the API reference from the docstrings: `python docs/build_api.py [OUT]` (needs pdoc:
`pip install -e ".[docs]"`), HTML pages in OUT (default docs/api/), one per module."""
import pkgutil
import sys
from pathlib import Path

import pdoc

import ppl_lvm


def modules():
    """ppl_lvm and every submodule (``__init__``'s ``__all__`` would hide them from pdoc)."""
    names = [info.name for info in pkgutil.walk_packages(ppl_lvm.__path__, "ppl_lvm.")]
    return ["ppl_lvm"] + [name for name in names if not name.endswith("__main__")]


def main(out=None):
    out = Path(out or Path(__file__).parent / "api")
    pdoc.pdoc(*modules(), output_directory=out)
    print(f"wrote the API reference of {len(modules())} modules into {out}/ "
          f"(open {out / 'index.html'})")
    return out


if __name__ == "__main__":
    main(*sys.argv[1:2])
