# cellrl: scRNA (+ scATAC priors) -> CellOracle oracle -> transition table -> PPO agent -> BFS benchmark.
# One rules/<stage>.smk per stage; each rule calls one thin workflow_scripts/<rule>.py; logic lives in cellrl/.

configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/demo_data.smk"
include: "rules/download.smk"
include: "rules/ingest.smk"
include: "rules/filter.smk"
include: "rules/split.smk"
include: "rules/base_grn.smk"
include: "rules/fit_oracle.smk"
include: "rules/transitions.smk"
include: "rules/hpo.smk"
include: "rules/train.smk"
include: "rules/bfs.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
