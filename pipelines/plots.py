"""`python -m pipelines.plots [PATH]`: an HTML page template for `dvc plots show` that renders offline.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so its plots stay blank without internet access;
this is that page with the same libraries inlined from the pinned `vl-convert-python` (`.dvc/config` points
`plots.html_template` at it)."""

from __future__ import annotations

import sys
from pathlib import Path

from colam import io as cio


def offline_template() -> str:
    import vl_convert
    from dvc_render.html import PAGE_HTML  # DVC's default page

    # The default bundle assigns vegaEmbed, vega and vegaLite to window, which DVC's plot divs call.
    # The bundle takes the place of {scripts}, where DVC would put its CDN links.
    bundle = vl_convert.javascript_bundle().replace("</script", "<\\/script")
    page = PAGE_HTML.replace("    <title>", '    <meta charset="utf-8">\n    <title>')
    return page.replace("{scripts}", f'<script type="text/javascript">\n{bundle}\n    </script>') + "\n"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else ".dvc/plots/offline.html")
    cio.write_text(path, offline_template())
    print(f"wrote {path} (offline template for dvc plots show)")
