"""Rewrite the results table in README.md from docs/results.json (written by the README's `seqkv eval` command).

    python bench/readme_table.py
"""
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def table(results) -> str:
    texts = [os.path.basename(r["text"] or "psf_license.txt").removesuffix(".txt") for r in results]
    names = [row["name"] for row in results[0]["rows"]]
    head = "| codec | " + " | ".join(f"{t}: ratio · mean KL · top-1" for t in texts) + " |"
    lines = [head, "|---|" + "---|" * len(texts)]
    for name in names:
        cells = []
        for r in results:
            row = next(x for x in r["rows"] if x["name"] == name)
            cells.append(f"{row['ratio']:.2f}x · {row['mean_kl']:.4f} · {row['top1']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    with open(os.path.join(ROOT, "docs", "results.json")) as f:
        results = json.load(f)
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        readme = f.read()
    block = f"{BEGIN}\n{table(results)}\n{END}"
    readme, n = re.subn(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)
    if n != 1:
        raise SystemExit("README.md has no results markers")
    with open(path, "w") as f:
        f.write(readme)


if __name__ == "__main__":
    main()
