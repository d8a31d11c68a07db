#!/usr/bin/env bash
# GPU check (issue 5), under 5 minutes: on a machine with a CUDA GPU,
#   1. trains 2 epochs on hymenoptera train/ (transfer mode with the feature cache, the classic
#      loop, and fine-tune), on the GPU and on the same machine's CPU;
#   2. scores a generated 5,000-image folder with `retrain score MODEL IMAGES --out URL --engine E
#      --json` for each engine (auto, torch, torch-bf16 on the GPU; auto, torch, onnx, onnx-int8
#      with CUDA_VISIBLE_DEVICES=, the CPU), checks that the GPU's float32 labels equal the CPU's,
#      plus a reference figure: the model alone on pre-read JPEGs (GPU against CPU decoding);
#   3. fine-tunes with DistributedDataParallel (issue 12, benchmarks/ddp_check.py): one process per
#      GPU (NCCL) on 2+ GPUs, one NCCL rank through the same launcher on 1 GPU, against one
#      process; checks that the final weights agree (SGD; largest difference under 5 % of the
#      largest change training made) and prints both runs' images/s;
# and prints images/s for each, GPU and CPU side by side. Without a GPU it runs the CPU half
# (DDP: 2 gloo processes, 1 epoch).
# The engines are validated on the training run's held-out images (split.parquet beside the model).
#
# Prepare once, here (copies the data and weights the machine cannot reach, and wheels for the
# Python packages its image lacks, into .gpu/, which git ignores locally):
#     benchmarks/gpu_check.sh --prepare
# Then run it through the device tool: run(command="bash benchmarks/gpu_check.sh",
#     carry=[".gpu"], timeout_s=420). Results: printed, and in $OUT/gpu_check.json when $OUT is set.
# Smaller, e.g. for a try on a CPU: GPU_CHECK_IMAGES=300 benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SHARED=${SHARED:-$ROOT/../shared}
PAYLOAD=$ROOT/.gpu
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PYTHONUNBUFFERED=1

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$PAYLOAD/whl" "$ROOT/.git/info"
    grep -qx '/.gpu/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$ROOT/.git/info/exclude"
    rm -rf "$PAYLOAD/hymenoptera_train"
    cp -r "$SHARED/data/hymenoptera_data/train" "$PAYLOAD/hymenoptera_train"
    cp "$SHARED/weights/squeezenet1_1_caffe-2c890718.pth" "$PAYLOAD/"
    # Dask for `retrain score` (the GPU image has torch, pandas, pyarrow, fsspec, pillow,
    # matplotlib, tqdm, cloudpickle, msgpack, psutil, toolz...). Prefect (about 75 packages,
    # 54 MB of UI) does not fit the 64 MiB carried; without it the check runs the same job
    # without Prefect (tasks.scoring.score_job, what the flow runs), and says so.
    PY=${PY:-$ROOT/.venv/bin/python}
    pkgs=()
    for p in dask distributed partd locket tblib tornado zict; do
        pkgs+=("$p==$("$PY" -c "import importlib.metadata as m; print(m.version('$p'))")")
    done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$PAYLOAD/whl" "${pkgs[@]}"
    du -sh "$PAYLOAD"
    exit 0
fi

started=$(date +%s)
if [[ -z "${PY:-}" ]]; then  # the project's venv here; the GPU machine's python3 (it has no .venv)
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
if compgen -G "$PAYLOAD/whl/*.whl" >/dev/null && ! "$PY" -c "import distributed" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$PAYLOAD"/whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
HYMENOPTERA=${HYMENOPTERA:-$PAYLOAD/hymenoptera_train}
[[ -d "$HYMENOPTERA" ]] || HYMENOPTERA=$SHARED/data/hymenoptera_data/train
WEIGHTS=${WEIGHTS:-$PAYLOAD/squeezenet1_1_caffe-2c890718.pth}
[[ -f "$WEIGHTS" ]] || WEIGHTS=$SHARED/weights/squeezenet1_1_caffe-2c890718.pth
IMAGES=${GPU_CHECK_IMAGES:-5000}
WORK=$(mktemp -d /tmp/gpu-check-XXXXXX)
RESULTS=${OUT:-$WORK}
echo "== $(date -u +%FT%TZ) $(hostname): $("$PY" -c 'import torch,sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", f"bf16 {torch.cuda.is_bf16_supported()}" if torch.cuda.is_available() else "")'), $(nproc) CPUs"
nvidia-smi -L 2>/dev/null || true

# ---- 1. training: 2 epochs on hymenoptera train/, GPU and CPU ---------------------------------
cat > "$WORK/train_check.py" <<'EOF'
import json, sys, time
import torch
from retrain.tasks.datastore import index_images, split_each_label
from retrain.tasks.networks import build_network, get_spec
from retrain.tasks.model_file import model_record, save_model_file
from retrain.tasks.preprocessing import Augmentation, load_images
from retrain.tasks.training import TrainingData, TrainingOptions, train

root, weights, model_out, json_out = sys.argv[1:5]
spec = get_spec("squeezenet-caffe")
index = index_images(root).images
classes = sorted(index["label"].unique())
split = split_each_label(index, (0.85, 0.15, 0.0), 0)
started = time.perf_counter()
parts = {s: split[split["split"] == s] for s in ("train", "val")}
pix = {s: load_images(list(rows["path"]), spec.preprocessing.input_size, threads=8) for s, rows in parts.items()}
tgt = {s: torch.tensor([classes.index(c) for c in rows["label"]]) for s, rows in parts.items()}
data = TrainingData(pix["train"], tgt["train"], pix["val"], tgt["val"])
decode_s = time.perf_counter() - started
n = len(data.train_targets)
print(f"hymenoptera: {n} training + {len(data.val_targets)} validation images decoded in {decode_s:.1f} s")

def one(env, mode, classic, epochs=2):
    torch.manual_seed(0)
    model, origin = build_network(spec.name, len(classes), weights)
    options = TrainingOptions(max_epochs=epochs, execution_environment=env, classic_loop=classic,
                              checkpoint_frequency=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    outcome = train(model, spec, spec.preprocessing, data, mode, options, Augmentation())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return model, origin, outcome, time.perf_counter() - t

envs = ["gpu", "cpu"] if torch.cuda.is_available() else ["cpu"]
if "gpu" in envs:  # CUDA context, cuDNN autotuning: not part of the figures
    for mode, classic in (("transfer", False), ("transfer", True), ("finetune", False)):
        one("gpu", mode, classic, epochs=1)
rows = []
for mode, classic, label in (("transfer", False, "transfer, feature cache"),
                             ("transfer", True, "transfer, classic loop"),
                             ("finetune", False, "fine-tune")):
    for env in envs:
        model, origin, outcome, seconds = one(env, mode, classic)
        cache = outcome.feature_cache or {}
        rows.append({"training": label, "device": env, "seconds": round(seconds, 2),
                     "images_per_second": round(2 * n / seconds, 1),
                     "feature_images_per_second": cache.get("images_per_second"),
                     "cache_location": cache.get("location"), "val_accuracy": outcome.final_val_accuracy})
        print(f"  {label:<24} {env}: {seconds:6.1f} s, {2 * n / seconds:8.1f} images/s, "
              f"val accuracy {outcome.final_val_accuracy:.3f}", flush=True)
        if env == envs[0] and mode == "transfer" and not classic:
            model.load_state_dict(outcome.state_dict)
            save_model_file(model_out, model_record(model, spec, classes, origin))
            split.to_parquet(model_out.rsplit("/", 1)[0] + "/split.parquet")  # the engine gate's held-out images
json.dump({"train_images": n, "epochs": 2, "decode_seconds": decode_s, "runs": rows}, open(json_out, "w"), indent=2)
EOF
echo "== training: 2 epochs on $HYMENOPTERA"
"$PY" "$WORK/train_check.py" "$HYMENOPTERA" "$WEIGHTS" "$WORK/model.pt" "$WORK/train.json"

# ---- 1b. DDP fine-tuning against one process ----------------------------------------------------
echo "== DDP fine-tuning on $HYMENOPTERA"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then ddp_epochs=2; else ddp_epochs=1; fi
DDP_CHECK_EPOCHS=${DDP_CHECK_EPOCHS:-$ddp_epochs} "$PY" "$ROOT/benchmarks/ddp_check.py" "$HYMENOPTERA" "$WEIGHTS" "$WORK/ddp.json" \
    > "$WORK/ddp.log" 2>&1 && grep '^  ' "$WORK/ddp.log" || { echo "  DDP check FAILED:"; tail -25 "$WORK/ddp.log"; }

# ---- 2. scoring a generated folder: GPU visible, then CPU only --------------------------------
cat > "$WORK/make_images.py" <<'EOF'
import os, sys
from concurrent.futures import ProcessPoolExecutor
from retrain.tasks.samples import SHAPES, make_shapes_dataset
root, total = sys.argv[1], int(sys.argv[2])
per = [total // len(SHAPES) + (i < total % len(SHAPES)) for i in range(len(SHAPES))]
with ProcessPoolExecutor(len(SHAPES)) as pool:
    list(pool.map(make_shapes_dataset, [root] * 3, per, [256] * 3, [1, 2, 3], [(s,) for s in SHAPES]))
print(f"generated {sum(len(files) for _, _, files in os.walk(root))} images (256 px JPEG) in {root}")
EOF
"$PY" "$WORK/make_images.py" "$WORK/images" "$IMAGES"

cat > "$WORK/score_check.py" <<'EOF'
import json, sys
from retrain.tasks.scoring import score_job
if __name__ == "__main__":  # Dask spawns worker processes
    model, images, out, engine = sys.argv[1:5]
    print(json.dumps(score_job(model, images, out, engine=engine), default=str))
EOF
score() {  # $1: label (device-engine); $2: engine; the rest: environment for the command
    local label=$1 engine=$2; shift 2
    local out=$WORK/scores-$label
    # stdout's last line is the JSON; logs (Prefect's, Dask's) go to stderr
    if "$PY" -c "import prefect, distributed" 2>/dev/null; then
        env "$@" "$PY" -m retrain.cli score "$WORK/model.pt" "$WORK/images" --out "$out" --store "$WORK/store" --engine "$engine" --json \
            > "$WORK/score-$label.out" 2> "$WORK/score-$label.log" || { tail -20 "$WORK/score-$label.log"; return 0; }
        echo "retrain score" > "$WORK/score-$label.how"
    elif "$PY" -c "import distributed" 2>/dev/null; then
        env "$@" "$PY" "$WORK/score_check.py" "$WORK/model.pt" "$WORK/images" "$out" "$engine" \
            > "$WORK/score-$label.out" 2> "$WORK/score-$label.log" || { tail -20 "$WORK/score-$label.log"; return 0; }
        echo "tasks.scoring.score_job (no Prefect here)" > "$WORK/score-$label.how"
    else
        echo "  neither Prefect nor Dask importable: no retrain score figure (run --prepare first)"
        return 0
    fi
    tail -1 "$WORK/score-$label.out" > "$WORK/score-$label.json"
    echo "  $label: $(cat "$WORK/score-$label.how"): $(cut -c1-300 "$WORK/score-$label.json")"
}
echo "== scoring $IMAGES images"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    score gpu torch PATH="$PATH"  # first: float32, the labels the CPU's must equal
    for engine in ${GPU_ENGINES:-auto torch-bf16}; do score "gpu-$engine" "$engine" PATH="$PATH"; done
fi
score cpu torch CUDA_VISIBLE_DEVICES=
for engine in ${CPU_ENGINES:-auto onnx-int8}; do score "cpu-$engine" "$engine" CUDA_VISIBLE_DEVICES=; done

# Reference: the model alone, on the JPEG bytes already read; decoding on the GPU (nvJPEG) and
# inference in bf16 there, against CPU decoding and inference with all cores.
cat > "$WORK/reference.py" <<'EOF'
import glob, json, sys, time
import torch, torchvision
from torchvision.io import decode_jpeg, ImageReadMode
import torchvision.transforms.v2.functional as TF
from retrain.tasks.model_file import load_model_file
loaded = load_model_file(sys.argv[1])
files = sorted(glob.glob(sys.argv[2] + "/**/*.jpg", recursive=True))
blobs = [torchvision.io.read_file(f) for f in files]
prep, size = loaded.preprocessing, loaded.preprocessing.input_size
out = {}
for device in (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]):
    model = loaded.model.to(device, memory_format=torch.channels_last).eval()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    batch = 256 if device == "cuda" else 64
    todo = blobs if device == "cuda" else blobs[:1000]  # the CPU is slow: 1,000 are enough to time
    for rep in range(2):  # the first pass warms up (cuDNN, nvJPEG); on the CPU one batch does
        part = todo if rep or device == "cuda" else todo[:batch]
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode(), amp:
            for s in range(0, len(part), batch):
                images = decode_jpeg(part[s:s + batch], mode=ImageReadMode.RGB, device=device)
                x = TF.resize(torch.stack(images), list(size), antialias=True)
                model(prep.normalize(x).contiguous(memory_format=torch.channels_last)).float().softmax(1).cpu()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    out[device] = {"images": len(part), "seconds": round(seconds, 2), "images_per_second": round(len(part) / seconds, 1)}
    print(f"  reference, decode + forward on {device}: {len(part) / seconds:8.1f} images/s", flush=True)
print(json.dumps(out))
EOF
"$PY" "$WORK/reference.py" "$WORK/model.pt" "$WORK/images" > "$WORK/reference.log" 2>&1 \
    && grep -v '^{' "$WORK/reference.log" && tail -1 "$WORK/reference.log" > "$WORK/reference.json" \
    || { echo "  reference failed:"; tail -5 "$WORK/reference.log"; }

# ---- the table --------------------------------------------------------------------------------
"$PY" - "$WORK" "$RESULTS/gpu_check.json" "$(( $(date +%s) - started ))" <<'EOF'
import json, os, sys
work, out, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def read(name):
    try:
        return json.load(open(os.path.join(work, name)))
    except (OSError, ValueError):
        return None
train = read("train.json") or {"runs": []}
result = {"training": train, "scoring": {}, "reference": read("reference.json"), "ddp": read("ddp.json"),
          "seconds": seconds}
print("\n" + "=" * 78)
print(f"{'images/s':<44} {'GPU':>10} {'CPU':>10} {'GPU/CPU':>9}")
by = {(r["training"], r["device"]): r for r in train["runs"]}
for label in dict.fromkeys(r["training"] for r in train["runs"]):
    g, c = by.get((label, "gpu"), {}).get("images_per_second"), by.get((label, "cpu"), {}).get("images_per_second")
    print(f"{'train 2 epochs, ' + label:<44} {g or '-':>10} {c or '-':>10} {f'{g / c:.1f}x' if g and c else '-':>9}")
for label in ("gpu", "cpu"):
    s = read(f"score-{label}.json")
    if s:
        s["how"] = open(os.path.join(work, f"score-{label}.how")).read().strip()
        result["scoring"][label] = s
for name in sorted(os.listdir(work)):
    label = name[len("score-"):-len(".json")] if name.startswith("score-") and name.endswith(".json") else None
    if label and label not in ("gpu", "cpu"):
        s = read(name)
        result["scoring"][label] = s
        print(f"score, {label:<38} {s.get('images_per_second')} images/s whole job, "
              f"{s.get('images_per_second_scoring')} while scoring (engine {s.get('engine')}, {s.get('decoder')} decoding)")
g, c = (result["scoring"].get(k, {}).get("images_per_second") for k in ("gpu", "cpu"))
if g and c:  # the same labels from the GPU's forward passes as from the CPU's?
    import pyarrow.parquet as pq
    on = {k: pq.read_table(os.path.join(work, f"scores-{k}", "scores.parquet")).to_pydict() for k in ("gpu", "cpu")}
    same = sum(a == b for a, b in zip(on["gpu"]["label"], on["cpu"]["label"]))
    gap = max((abs(a - b) for a, b in zip(on["gpu"]["score"], on["cpu"]["score"]) if a is not None and b is not None), default=None)
    result["scoring"]["labels_equal"] = f"{same}/{len(on['cpu']['label'])}"
    result["scoring"]["max_score_difference"] = gap
    print(f"GPU and CPU scoring: same label for {same} of {len(on['cpu']['label'])} images, largest score difference {gap}")
how = (result["scoring"].get("cpu") or result["scoring"].get("gpu") or {}).get("how", "not run")
print(f"{'score ' + str((result['scoring'].get('cpu') or {}).get('images', '?')) + ' images':<44} "
      f"{round(g, 1) if g else '-':>10} {round(c, 1) if c else '-':>10} {f'{g / c:.1f}x' if g and c else '-':>9}")
ref = result["reference"] or {}
g, c = ref.get("cuda", {}).get("images_per_second"), ref.get("cpu", {}).get("images_per_second")
print(f"{'reference: decode + model only':<44} {g or '-':>10} {c or '-':>10} {f'{g / c:.1f}x' if g and c else '-':>9}")
print(f"(scoring through {how}; the GPU column is with the GPU visible to it, the CPU column with "
      f"CUDA_VISIBLE_DEVICES=)")
ddp = result["ddp"]
if ddp:
    d = ddp["runs"]["ddp"]
    print(f"DDP fine-tune ({d['processes']} x {d['backend']}): {d['images_per_second']} images/s against "
          f"{ddp['runs']['one process']['images_per_second']} in one process; largest weight difference "
          f"{ddp['max_weight_difference']:.3g} of {ddp['max_weight_change']:.3g} moved: {'ok' if ddp['ok'] else 'FAILED'}")
else:
    print("DDP fine-tune: no result (see the log above)")
print(f"(whole check {seconds} s; results {out})")
json.dump(result, open(out, "w"), indent=2, default=str)
EOF
