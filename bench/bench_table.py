"""Print a markdown table from a pytest-benchmark JSON file of bench/bench_codec.py.

    python -m pytest bench/bench_codec.py --benchmark-only --benchmark-json=bench.json
    python bench/bench_table.py bench.json
"""
import json
import sys


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    print("| benchmark | median ms | MB/s of fp16 cache | ratio vs fp16 | bits/elem | speed vs zstd-3 (same direction) "
          "| speed vs balanced preset (same run) | speed vs the codec core's published figure |")
    print("|---|---|---|---|---|---|---|---|")
    for b in data["benchmarks"]:
        e = b["extra_info"]
        vs = e.get("speed_vs_zstd3")
        extra = e.get("balanced_decode_speedup_vs_prefill")
        print(f"| {b['name']} | {b['stats']['median'] * 1000:.1f} | {e.get('mb_per_s_fp16', 0):.1f} | "
              f"{format(e['ratio_vs_fp16'], '.3f') if 'ratio_vs_fp16' in e else '–'} | "
              f"{format(e['bits_per_element'], '.3f') if 'bits_per_element' in e else '–'} | "
              f"{format(vs, '.3f') + 'x' if vs else '–'}{f' (balanced decode is {extra:.0f}x faster than this prefill)' if extra else ''} | "
              f"{format(e['speed_vs_balanced'], '.2f') + 'x' if 'speed_vs_balanced' in e else '–'} | "
              f"{format(e['speed_vs_codec_core_figure'], '.2f') + 'x' if 'speed_vs_codec_core_figure' in e else '–'} |")
    print(f"\nmachine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, {data['datetime']}")


if __name__ == "__main__":
    main(sys.argv[1])
