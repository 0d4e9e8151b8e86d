"""Calibrated profiles that ship inside the package, found by the model's architecture fingerprint.

seqkv ships the profile of its embedded model (SmolLM2-135M-Instruct) in ``seqkv/data/profiles/``, as a
compact profile file (:meth:`seqkv.Profile.save` with ``compact=True``), so that

    blob = seqkv.encode(cache, model=model, target_kl=0.01)   # no profile=: the shipped one
    cache2 = seqkv.decode(blob, model=model)                  # found again by the sha256 the container records

work out of the box for that model.  ``index.json`` lists each shipped profile with the model's
fingerprint and weights digest (``seqkv.layout_from_model(model)``) and the SHA-256 of the profile's codec
part, which every container made with it records (``Profile.ref()``).  The compact file unpacks to the same
profile file bytes on every machine (it records their SHA-256 and loading checks it; see
:mod:`seqkv.profile`), so that SHA-256 never changes; a test checks the index against the file.
``seqkv/data/profiles/PROVENANCE.md`` says how each one was made.

Any other model has no shipped profile: calibrate one (``seqkv calibrate``, or ``seqkv.calibrate``) and
pass it as ``profile=``.

Rebuild a shipped profile from a full calibrated profile file (what PROVENANCE.md records):

    python -m seqkv.shipped_profiles SOURCE.safetensors --name smollm2-135m-instruct --model SmolLM2-135M-Instruct
"""
from __future__ import annotations

import functools
import json
from importlib import resources

from .errors import ConfigError
from .layout import layout_from_model
from .profile import Profile, ProfileError

PROFILES_DIR = ("data", "profiles")   # inside the seqkv package
INDEX_NAME = "index.json"
BASIS_MANTISSA_BITS = 14   # what the shipped profiles keep (Profile.rounded)
CROSS_MANTISSA_BITS = 10

CALIBRATE_HINT = (
    "calibrate a profile for it once (a few minutes to half an hour on a CPU) and pass it as profile=: in Python, "
    "`profile = seqkv.calibrate(model, [text1, text2, text3], tokenizer=tokenizer); profile.save('model.profile')`, "
    "or on the command line `seqkv calibrate --model /path/to/hf-model-dir -o model.profile`; then "
    "`seqkv.encode(cache, model=model, profile=seqkv.Profile.load('model.profile'), target_kl=0.01)`"
)


def _data_dir():
    return resources.files("seqkv").joinpath(*PROFILES_DIR)


@functools.lru_cache(maxsize=1)
def shipped_index() -> tuple[dict, ...]:
    """The shipped profiles: dicts with ``name``, ``model``, ``file``, ``fingerprint``, ``weights_digest``,
    ``codec_sha256`` and ``codec_bytes`` (the profile's ``ref()``) and ``file_bytes`` (the compact file)."""
    path = _data_dir().joinpath(INDEX_NAME)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["profiles"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProfileError(f"seqkv's shipped profile index {INDEX_NAME} is unreadable: {exc}") from None
    return tuple(entries)


def find(layout) -> dict | None:
    """The index entry of the profile shipped for ``layout``'s architecture (a ModelLayout, model or config),
    or None.  The weights digest is not compared here: see :func:`shipped_profile`."""
    fingerprint = layout_from_model(layout).fingerprint
    return next((e for e in shipped_index() if e["fingerprint"] == fingerprint), None)


@functools.lru_cache(maxsize=None)
def load_shipped(name: str) -> Profile:
    """The shipped profile ``name``, loaded once per process; ProfileError if its file is not what the index says."""
    entry = next((e for e in shipped_index() if e["name"] == name), None)
    if entry is None:
        raise ConfigError(f"no shipped profile is named {name!r}; shipped: {[e['name'] for e in shipped_index()]}")
    try:
        data = _data_dir().joinpath(entry["file"]).read_bytes()
    except OSError as exc:
        raise ProfileError(f"the shipped profile {entry['file']} is missing from the package: {exc}") from None
    profile = Profile.from_bytes(data, what=f"shipped profile {entry['file']}")
    if profile.ref() != {"sha256": entry["codec_sha256"], "bytes": entry["codec_bytes"]}:
        raise ProfileError(f"the shipped profile {entry['file']} does not match its index entry (codec sha256 "
                           f"{profile.codec_hash[:16]}…, index {entry['codec_sha256'][:16]}…)")
    return profile


def shipped_profile(model=None, config=None) -> Profile:
    """The calibrated profile shipped for ``model`` (or ``config``); a ConfigError saying how to calibrate
    one where seqkv ships none.  With a model, its weights must be the ones the profile was calibrated on."""
    if model is None and config is None:
        raise ConfigError("the calibrated codec needs the model (model= or config=) to find its profile, "
                          "or a profile= of its own")
    layout = layout_from_model(model if model is not None else config)
    entry = find(layout)
    if entry is None:
        shipped = ", ".join(e["model"] for e in shipped_index()) or "none"
        raise ConfigError(f"seqkv ships no calibrated profile for this model (architecture fingerprint "
                          f"{layout.fingerprint[:16]}…; shipped: {shipped}): {CALIBRATE_HINT}")
    if layout.weights_digest and entry["weights_digest"] and layout.weights_digest != entry["weights_digest"]:
        raise ConfigError(f"the shipped profile is for {entry['model']}; this model has its architecture but other "
                          f"weights (a fine-tune?), so the profile's sensitivities do not hold for it: {CALIBRATE_HINT}")
    return load_shipped(entry["name"])


def profile_for_ref(ref) -> Profile | None:
    """The shipped profile whose codec part a container records (its header's profile reference, an object
    with ``sha256``, or that sha256 as a string), or None."""
    if ref is None:
        return None
    sha = ref if isinstance(ref, str) else getattr(ref, "sha256", None)
    entry = next((e for e in shipped_index() if e["codec_sha256"] == sha), None)
    return None if entry is None else load_shipped(entry["name"])


def build(source: str, name: str, model: str, out_dir: str | None = None,
          basis_bits: int = BASIS_MANTISSA_BITS, cross_bits: int = CROSS_MANTISSA_BITS) -> dict:
    """Round the profile file ``source`` (Profile.rounded), write it compact as ``{name}.compact.profile`` into
    ``out_dir`` (default: the package's profile folder) and add or replace its index entry; returns the entry."""
    import hashlib
    import os

    out_dir = out_dir or os.fspath(_data_dir())
    source_profile = Profile.load(source)
    profile = source_profile.rounded(basis_bits, cross_bits)
    file_name = f"{name}.compact.profile"
    path = os.path.join(out_dir, file_name)
    profile.save(path, compact=True)
    with open(source, "rb") as f:
        source_sha = hashlib.sha256(f.read()).hexdigest()
    entry = {"name": name, "model": model, "file": file_name, "fingerprint": profile.layout.fingerprint,
             "weights_digest": profile.layout.weights_digest, "codec_sha256": profile.codec_hash,
             "codec_bytes": len(profile.codec_bytes()), "file_bytes": os.path.getsize(path),
             "source_sha256": source_sha, "source_bytes": os.path.getsize(source),
             "basis_mantissa_bits": basis_bits, "cross_mantissa_bits": cross_bits}
    index_path = os.path.join(out_dir, INDEX_NAME)
    try:
        with open(index_path, encoding="utf-8") as f:
            entries = [e for e in json.load(f)["profiles"] if e["name"] != name]
    except FileNotFoundError:
        entries = []
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump({"profiles": entries + [entry]}, f, indent=1, sort_keys=True)
        f.write("\n")
    shipped_index.cache_clear()
    load_shipped.cache_clear()
    return entry


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m seqkv.shipped_profiles",
                                description="Make a shipped (rounded, compact) profile from a calibrated profile file.")
    p.add_argument("source", help="a profile file written by `seqkv calibrate -o`")
    p.add_argument("--name", required=True, help="the shipped profile's name (file {name}.compact.profile)")
    p.add_argument("--model", required=True, help="the model's name, for humans")
    p.add_argument("--out-dir", help="default: the package's seqkv/data/profiles/")
    args = p.parse_args(argv)
    print(json.dumps(build(args.source, args.name, args.model, args.out_dir), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
