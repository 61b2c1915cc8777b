"""The construction study: experts built by each rule vs static pruning by the same rule, before
training, with and without the refit, under oracle routing (readme_jax/eval/construction.py).

  python launch/construction.py --out runs/construction
  python launch/construction.py --groupings=domain,kmeans8 \
      --constructions=magnitude/intersection,frequency/core0.5/overlap --tokens=4096

Model, domains, calibration text and the refit's ridge come from the run config
(configs/smollm2_135m.py: model.*, data.domains, calib.*, refactor.ridge,
refactor.calib_sequences). Writes OUT/construction.json (with per-window NLLs) and
OUT/construction.md. Parts run separately (one grouping per process) merge into one table:

  python launch/construction.py --merge runs/a/construction.json,runs/b/construction.json \
      --out runs/construction
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags, logging

from readme_jax import cli
from readme_jax.checkpoints import models
from readme_jax.eval import construction
from readme_jax.eval.domains import domain_stream
from readme_jax.refactor.pipeline import Recipe, parse_domains

_CONFIG = cli.define_config("configs/smollm2_135m.py", "Run config (model, data, calibration).")
flags.DEFINE_string("out", "runs/construction", "Output directory.")
flags.DEFINE_list(
    "groupings",
    ["domain"],
    "Groupings: domain, kmeansE (E token clusters), chunkE (E clusters of 128-token contexts), "
    "router (the tokens --router sends to each expert).",
)
flags.DEFINE_list(
    "constructions",
    ["magnitude/intersection", "frequency/intersection", "frequency/core0.5/overlap"],
    "SCORE/intersection or SCORE/coreFRAC/{overlap,partition}; SCORE: magnitude, frequency.",
)
flags.DEFINE_string(
    "router",
    "",
    "A Read-ME model directory (e.g. RUN/moe_router): the 'router' grouping rebuilds the experts "
    "around the tokens this router sends to each expert, and routes by it (no oracle).",
)
flags.DEFINE_integer("tokens", 4096, "Held-out tokens per domain (validation split).")
flags.DEFINE_string("refit", "both", "none | lstsq | both: models without and/or with the refit.")
flags.DEFINE_list("merge", [], "construction.json files of studies run in parts: merge, no run.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.merge:
        parts = [json.loads(Path(f).read_text()) for f in FLAGS.merge]
        res = construction.merge(parts)
        out = construction.save(res, FLAGS.out)
        print(construction.render(res))
        print(f"-> {out}/construction.json, {out}/construction.md")
        return
    c = _CONFIG.value
    recipe = Recipe.from_config(c)
    refit = {"none": (False,), "lstsq": (True,), "both": (False, True)}.get(FLAGS.refit)
    if refit is None:
        raise SystemExit(f"error: --refit={FLAGS.refit!r}: choose none, lstsq or both")
    for name in FLAGS.constructions:
        construction.parse_construction(name)  # fail before any work
    sc = construction.StudyConfig(
        remain_rate=recipe.remain_rate,
        groupings=tuple(FLAGS.groupings),
        constructions=tuple(FLAGS.constructions),
        refit=refit,
        ridge=c.refactor.ridge,
        refit_sequences=c.refactor.calib_sequences or recipe.num_sequences,
        seed=recipe.seed,
        router=FLAGS.router,
    )
    cfg, dense, tok = models.load_dense(recipe.checkpoint, recipe.dtype, False, recipe.seed)
    batches = recipe.batches(tok)
    streams = {
        d: domain_stream(d, "validation", tok, max_tokens=FLAGS.tokens, cache=recipe.data_cache)[0]
        for d in parse_domains(recipe.domains)
    }
    res = construction.run_study(cfg, dense, batches, streams, sc, out=FLAGS.out)
    out = construction.save(res, FLAGS.out)
    print(construction.render(res))
    print(f"-> {out}/construction.json, {out}/construction.md")


if __name__ == "__main__":
    cli.run(main)
