"""An HTML page template for `dvc plots show` that renders offline.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so its plots stay blank on
a machine without internet access. This template inlines the same libraries, bundled by the
pinned `vl-convert-python` wheel; `.dvc/config` points `plots.html_template` at it.

    python -m pipelines.plots [PATH]    (default .dvc/plots/offline.html; `make setup` runs it)
"""

from __future__ import annotations

import sys
from pathlib import Path

from colam import io as cio

DEFAULT_PATH = Path(".dvc/plots/offline.html")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <script type="text/javascript">
%(bundle)s
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_template() -> str:
    import vl_convert

    # The default bundle assigns vegaEmbed, vega and vegaLite to window, which DVC's plot divs call.
    # The {placeholders} are DVC's; %-formatting leaves them alone.
    return PAGE % {"bundle": vl_convert.javascript_bundle().replace("</script", "<\\/script")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else DEFAULT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    cio.write_text(path, offline_template())
    print(f"wrote {path} (offline template for dvc plots show)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
