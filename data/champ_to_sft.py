#!/usr/bin/env python3
"""Turn the unpacked CHAMP wheel (PyPI champ-dataset==1.0.0, MIT) into an SFT chat file.

    python3 data/champ_to_sft.py [CHAMP_DIR]

CHAMP_DIR defaults to data/downloads/champ, where `data/fetch champ` unpacks the wheel.
Reads CHAMP_DIR/champ_dataset/dataset_files/v0.json and writes CHAMP_DIR/sft.jsonl,
one JSON object per problem:

    id        CHAMP's problem identifier, e.g. "P_Combinatorics_1"
    prompt    the problem statement
    response  the step-by-step solution, one step per paragraph, then
              "The answer is \\boxed{ANSWER}."
    answer    CHAMP's final answer text

CHAMP stores text with "@@" marks around maths spans (its "_raw_*" fields); the package's
own loader drops them ("text" = raw.replace("@@", "")) and so does this script. Nothing
else in the text is changed beyond stripping surrounding whitespace. Standard library only.
"""
import json
import os
import sys
import tempfile

MARK = "@@"


def plain(raw):
    """CHAMP's display text for a raw field: the '@@' maths marks removed, whitespace stripped."""
    if not isinstance(raw, str):
        return ""
    return raw.replace(MARK, "").strip()


def field(d, name):
    """Text of field `name` ("text" or "answer"): from `_raw_<name>` as CHAMP's loader does,
    falling back to the stored `_<name>`."""
    raw = d.get("_raw_" + name)
    if isinstance(raw, str):
        return plain(raw)
    return plain(d.get("_" + name))


def convert(problem):
    """One SFT row for a CHAMP problem dict, or None if it lacks a statement, solution or answer."""
    prompt = field(problem, "text")
    answer = field(problem, "answer")
    solution = problem.get("solution") or {}
    steps = [field(s, "text") for s in (solution.get("steps") or []) if isinstance(s, dict)]
    steps = [s for s in steps if s]
    if not prompt or not answer or not steps:
        return None
    response = "\n\n".join(steps + ["The answer is \\boxed{%s}." % answer])
    return {"id": problem.get("identifier"), "prompt": prompt, "response": response, "answer": answer}


def main(argv):
    if len(argv) > 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    here = os.path.dirname(os.path.abspath(__file__))
    champ_dir = argv[1] if len(argv) == 2 else os.path.join(here, "downloads", "champ")
    src = os.path.join(champ_dir, "champ_dataset", "dataset_files", "v0.json")
    dst = os.path.join(champ_dir, "sft.jsonl")
    if not os.path.isfile(src):
        print("error: %s not found; run `data/fetch champ` first" % src, file=sys.stderr)
        return 1

    with open(src, encoding="utf-8") as f:
        problems = json.load(f).get("problems") or {}

    rows, skipped = [], 0
    for key, problem in problems.items():
        if not isinstance(problem, dict):
            skipped += 1
            continue
        problem.setdefault("identifier", key)
        row = convert(problem)
        if row is None:
            skipped += 1
        else:
            rows.append(row)
    if skipped:
        print("champ sft: skipped %d problem(s) without a statement, solution or answer" % skipped)
    if not rows:
        print("error: no usable problems in %s" % src, file=sys.stderr)
        return 1

    fd, tmp = tempfile.mkstemp(prefix=".sft.", suffix=".jsonl.tmp", dir=champ_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    print("champ sft: wrote %d rows to %s" % (len(rows), dst))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
