"""mkdocs hook: publish the result images the study pages show from where the studies write them.

The plots stay next to the scripts that make them (experiments/results/, bench/results/); a page
links them as if those folders sat beside docs/ (``../experiments/results/...`` from
docs/studies/), and this hook adds exactly those PNG files to the site, so ``--strict`` still
fails on a link to a missing image.
"""

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULT_DIRS = ("experiments/results", "bench/results")


def on_files(files, config):
    for folder in RESULT_DIRS:
        for png in sorted((ROOT / folder).rglob("*.png")):
            rel = png.relative_to(ROOT).as_posix()
            files.append(File(rel, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
