#!/usr/bin/env bash
# GPU check (issues 5, 12 and 25), about 8 minutes on a machine with one H100/H200 and 16 cores:
#   0. scoring 50,000 photos end to end (issue 25): JPEGs of mixed sizes (a few hundred generated
#      base images, each photo a random crop of one re-encoded; greyscale, progressive, 4:4:4,
#      EXIF-rotated, CMYK, PNG and corrupt files among them) scored by `retrain score` with a
#      model of random weights, at the default partition size and at 1,024; prints images/s (over
#      the command's wall, the job's own, and while scoring), the decoder (how many JPEGs nvJPEG
#      decoded on the GPU; the rest on the CPU) and the workers. Goal: >= 5,000 images/s on an
#      H100-class GPU. Fails when a file has no row, when the failed rows are not exactly the
#      corrupt files, or when a GPU was there and decoded no JPEG;
#   1. trains 2 epochs on hymenoptera train/ (transfer mode with the feature cache, the classic
#      loop, and fine-tune), on the GPU and on the same machine's CPU;
#   2. fine-tunes with DistributedDataParallel (issue 12, benchmarks/ddp_check.py): one process per
#      GPU (NCCL) on 2+ GPUs, one NCCL rank through the same launcher on 1 GPU, against one
#      process; checks that the final weights agree (SGD; largest difference under 5 % of the
#      largest change training made) and prints both runs' images/s;
#   3. scores a generated 5,000-image folder with step 1's model for each engine (auto, torch,
#      torch-bf16 on the GPU; auto, torch, onnx-int8 with CUDA_VISIBLE_DEVICES=, the CPU) and
#      checks that the GPU's float32 labels equal the CPU's;
#   4. a reference: the model alone on step 0's JPEG bytes already read (GPU: nvJPEG and bf16;
#      CPU: all cores);
# and prints images/s for each, GPU and CPU side by side. Without a GPU it runs the CPU half
# (2,000 photos; DDP: 2 gloo processes, 1 epoch). Exits 1 when a step failed.
# The engines are validated on the training run's held-out images (split.parquet beside the model).
#
# Prepare once, here (copies the data and weights the machine cannot reach, and wheels for the
# Python packages its image lacks, into .gpu/, which git ignores locally; without ../shared only
# the wheels, and steps 1-3 are skipped there, saying so):
#     benchmarks/gpu_check.sh --prepare
# Then run it through the device tool: run(command="bash benchmarks/gpu_check.sh",
#     carry=[".gpu"], timeout_s=540). Results: printed, and in $OUT/gpu_check.json when $OUT is set.
# Step 0 alone (about 2 minutes): GPU_CHECK_STEPS=photos. Other steps: GPU_CHECK_STEPS="photos
# train ddp engines reference" (the default). Counts: GPU_CHECK_PHOTOS, GPU_CHECK_IMAGES.
# Smallest, for a try on a CPU: benchmarks/gpu_check.sh --quick (600 photos, 300 images).
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
    if [[ -d "$SHARED/data/hymenoptera_data/train" && -f "$SHARED/weights/squeezenet1_1_caffe-2c890718.pth" ]]; then
        cp -r "$SHARED/data/hymenoptera_data/train" "$PAYLOAD/hymenoptera_train"
        cp "$SHARED/weights/squeezenet1_1_caffe-2c890718.pth" "$PAYLOAD/"
    else
        echo "no hymenoptera or weights under $SHARED: the training, DDP and engine steps will be skipped"
    fi
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
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
if [[ "${1:-}" == "--quick" ]]; then photos=600 images=300; elif [[ $CUDA == 1 ]]; then photos=50000 images=5000; else photos=2000 images=5000; fi
PHOTOS=${GPU_CHECK_PHOTOS:-$photos}
IMAGES=${GPU_CHECK_IMAGES:-$images}
STEPS=" ${GPU_CHECK_STEPS:-photos train ddp engines reference} "
WORK=$(mktemp -d /tmp/gpu-check-XXXXXX)
RESULTS=${OUT:-$WORK}
FAILED=()
failed() { FAILED+=("$1"); echo "  FAILED: $1"; }
wanted() { [[ "$STEPS" == *" $1 "* ]]; }
if [[ -d "$HYMENOPTERA" && -f "$WEIGHTS" ]]; then TRAINING_DATA=1; else TRAINING_DATA=0; fi
echo "== $(date -u +%FT%TZ) $(hostname): $("$PY" -c 'import torch,torchvision,sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, cuda {torch.cuda.is_available()}", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", f"bf16 {torch.cuda.is_bf16_supported()}" if torch.cuda.is_available() else "")'), $(nproc) CPUs"
nvidia-smi -L 2>/dev/null || true
"$PY" -c 'from retrain.tasks.scoring.cluster import GPU_WORKER_THREADS as t, visible_gpus
g = visible_gpus()
print("local scoring workers:", f"one per GPU {g}, {t} tasks at once each" if g else "one per core")' || failed "retrain import"

# retrain score (or, where Prefect is not installed, the same job through tasks.scoring.score_job)
# of FOLDER with MODEL into scores-LABEL: score-LABEL.json (its summary), .how, .wall (seconds)
cat > "$WORK/score_check.py" <<'EOF'
import json, sys
from retrain.tasks.scoring import DEFAULT_PARTITION_SIZE, score_job
if __name__ == "__main__":  # Dask spawns worker processes
    model, images, out, engine = sys.argv[1:5]
    size = int(sys.argv[5]) if len(sys.argv) > 5 else DEFAULT_PARTITION_SIZE
    print(json.dumps(score_job(model, images, out, engine=engine, partition_size=size), default=str))
EOF
score() {  # $1: label; $2: model; $3: folder; $4: engine; $5: partition size ("": default); the rest: environment
    local label=$1 model=$2 folder=$3 engine=$4 parts=$5 t0
    shift 5
    local out=$WORK/scores-$label
    t0=$(date +%s.%N)
    # stdout's last line is the JSON; logs (Prefect's, Dask's) go to stderr
    if "$PY" -c "import prefect, distributed" 2>/dev/null; then
        env "$@" "$PY" -m retrain.cli score "$model" "$folder" --out "$out" --store "$WORK/store" --engine "$engine" --json \
            ${parts:+--partition-size "$parts"} > "$WORK/score-$label.out" 2> "$WORK/score-$label.log" \
            || { failed "score $label"; tail -20 "$WORK/score-$label.log"; return 0; }
        echo "retrain score" > "$WORK/score-$label.how"
    elif "$PY" -c "import distributed" 2>/dev/null; then
        env "$@" "$PY" "$WORK/score_check.py" "$model" "$folder" "$out" "$engine" $parts \
            > "$WORK/score-$label.out" 2> "$WORK/score-$label.log" || { failed "score $label"; tail -20 "$WORK/score-$label.log"; return 0; }
        echo "tasks.scoring.score_job (no Prefect here)" > "$WORK/score-$label.how"
    else
        failed "score $label: neither Prefect nor Dask importable (run --prepare first)"
        return 0
    fi
    awk -v t0="$t0" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.2f\n", t1 - t0 }' > "$WORK/score-$label.wall"
    tail -1 "$WORK/score-$label.out" > "$WORK/score-$label.json"
}

# ---- 0. scoring 50,000 photos end to end ---------------------------------------------------------
cat > "$WORK/make_photos.py" <<'EOF'
"""PHOTOS files in FOLDER/<10 subfolders>, fast: 256 generated base images (960-1280 px, smooth
colour fields with edges and grain), each photo a random crop of one (30-100 % of each side)
re-encoded at quality 70-95. Among them, as in a real folder: 4:4:4 JPEGs, greyscale and
progressive ones, EXIF-rotated, CMYK and PNG files (decoded on the CPU) and corrupt JPEGs (rows
with an error). Writes photos.json: the counts, mean megapixels and kilobytes."""
import io, json, os, sys
from concurrent.futures import ProcessPoolExecutor
import numpy as np
from PIL import Image

BASES = 256
# every n-th photo is of this kind (checked in this order), the rest baseline JPEGs
KINDS = (("corrupt", 5000), ("cmyk", 1000), ("rotated", 500), ("png", 200), ("progressive", 33), ("grey", 50))

def kind_of(j):
    return next((k for k, (name, n) in enumerate(KINDS) if j % n == k), None)

def base(i):
    rng = np.random.default_rng(i)
    w, h = [(1024, 768), (1280, 960), (960, 1280), (1200, 800)][i % 4]
    low = Image.fromarray(rng.integers(0, 256, (h // 48, w // 48, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.asarray(low, dtype=np.float32)
    y, x = np.mgrid[0:h, 0:w]
    for _ in range(6):  # hard edges: discs and bars of flat colour
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(40, 300)
        a[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    a += rng.normal(0, 5, a.shape)  # sensor grain
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))

def make(args):
    root, i, photos = args
    rng = np.random.default_rng(10_000 + i)
    im = base(i)
    counts, pixels, size = {}, 0, 0
    for j in photos:
        k = kind_of(j)
        name = "photo" if k is None else KINDS[k][0]
        w, h = (int(s * rng.uniform(0.3, 1.0)) for s in im.size)
        x, y = rng.integers(0, im.width - w + 1), rng.integers(0, im.height - h + 1)
        crop = im.crop((x, y, x + w, y + h))
        out, save = io.BytesIO(), {"quality": int(rng.integers(70, 96))}
        if name == "png":
            crop.save(out, "PNG", compress_level=1)
        else:
            if name == "grey":
                crop = crop.convert("L")
            elif name == "cmyk":
                crop = crop.convert("CMYK")
            elif name == "progressive":
                save["progressive"] = True
            elif name == "rotated":
                exif = Image.Exif()
                exif[0x0112] = 6
                save["exif"] = exif
            elif j % 10 == 7:
                save["subsampling"] = 0  # 4:4:4
            crop.save(out, "JPEG", **save)
        data = out.getvalue()
        if name == "corrupt":  # a bogus Huffman table: the header reads, the decoders fail
            at = data.find(b"\xff\xc4") + 5
            data = data[:at] + b"\xff" * 16 + data[at + 16 :]
        folder = os.path.join(root, f"set{j % 10}")
        with open(os.path.join(folder, f"{name}-{j:06d}.{'png' if name == 'png' else 'jpg'}"), "wb") as f:
            f.write(data)
        counts[name] = counts.get(name, 0) + 1
        pixels += w * h
        size += len(data)
    return counts, pixels, size

if __name__ == "__main__":
    root, total = sys.argv[1], int(sys.argv[2])
    for s in range(10):
        os.makedirs(os.path.join(root, f"set{s}"), exist_ok=True)
    jobs = [(root, i, range(i, total, BASES)) for i in range(min(BASES, total))]
    counts, pixels, size = {}, 0, 0
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        for c, p, s in pool.map(make, jobs):
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
            pixels, size = pixels + p, size + s
    record = {"photos": total, "kinds": counts, "corrupt": counts.get("corrupt", 0),
              "mean_megapixels": round(pixels / total / 1e6, 3), "mean_kilobytes": round(size / total / 1e3, 1)}
    json.dump(record, open(os.path.join(root, "..", "photos.json"), "w"))
    print(f"  {total} photos, {record['mean_megapixels']} megapixels and {record['mean_kilobytes']} KB on average: {counts}")
EOF
cat > "$WORK/random_model.py" <<'EOF'
import sys, torch
from retrain.tasks.model_file import model_record, save_model_file
from retrain.tasks.networks import build_network, get_spec
torch.manual_seed(0)
spec, classes = get_spec("squeezenet-caffe"), [f"class{i}" for i in range(10)]
model, origin = build_network(spec.name, len(classes), "none")  # --weights none
save_model_file(sys.argv[1], model_record(model, spec, classes, origin))
EOF
cat > "$WORK/photos_report.py" <<'EOF'
"""One line per scoring of the photos; exits 1 when its rows are wrong."""
import json, sys
work, label, cuda = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
made = json.load(open(f"{work}/photos.json"))
s = json.load(open(f"{work}/score-{label}.json"))
s = {**json.load(open(f"{work}/scores-{label}/summary.json")), **s}  # all its figures (--json keeps some)
wall = float(open(f"{work}/score-{label}.wall").read())
how = open(f"{work}/score-{label}.how").read().strip()
images, failed, decoded = s.get("images"), s.get("failed"), s.get("gpu_decoded")
rate = images / wall if images else 0
print(f"  {label}: {rate:,.0f} images/s over the command's {wall:.1f} s; {s.get('images_per_second')} over the job, "
      f"{s.get('images_per_second_scoring')} while scoring ({how}, engine {s.get('engine')})")
print(f"    decoder: nvJPEG on the GPU for {decoded} of {images} images, the rest on the CPU "
      f"({s.get('decoder')} decoder); failed rows {failed} (corrupt files {made['corrupt']})"
      + (f"; goal 5,000 images/s on a GPU: {'met' if rate >= 5000 else 'NOT met'}" if cuda else ""))
problems = []
if images != made["photos"] or s.get("processed") != made["photos"]:
    problems.append(f"{images} rows, {s.get('processed')} processed, for {made['photos']} photos")
if failed != made["corrupt"]:
    problems.append(f"{failed} failed rows for {made['corrupt']} corrupt files")
if cuda and not decoded:
    problems.append("a GPU was there and decoded no JPEG")
json.dump({**s, "wall_seconds": wall, "images_per_second_wall": round(rate, 1), "how": how},
          open(f"{work}/score-{label}.json", "w"))
if problems:
    print("    " + "; ".join(problems))
    sys.exit(1)
EOF
if wanted photos; then
    echo "== scoring $PHOTOS photos end to end, a model of random weights (engine ${PHOTO_ENGINE:-torch})"
    if "$PY" "$WORK/make_photos.py" "$WORK/photos" "$PHOTOS" && "$PY" "$WORK/random_model.py" "$WORK/random.pt"; then
        for parts in "" 1024; do
            label=photos-partitions-${parts:-default}
            score "$label" "$WORK/random.pt" "$WORK/photos" "${PHOTO_ENGINE:-torch}" "$parts" PATH="$PATH"
            [[ -f "$WORK/score-$label.json" ]] && { "$PY" "$WORK/photos_report.py" "$WORK" "$label" "$CUDA" || failed "$label"; }
        done
    else
        failed "making the photos or the model"
    fi
fi

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
if wanted train && [[ $TRAINING_DATA == 1 ]]; then
    echo "== training: 2 epochs on $HYMENOPTERA"
    "$PY" "$WORK/train_check.py" "$HYMENOPTERA" "$WEIGHTS" "$WORK/model.pt" "$WORK/train.json" || failed "training"
elif wanted train; then
    echo "== training: skipped (no hymenoptera or weights here: run --prepare where ../shared is)"
fi

# ---- 2. DDP fine-tuning against one process ----------------------------------------------------
if wanted ddp && [[ $TRAINING_DATA == 1 ]]; then
    echo "== DDP fine-tuning on $HYMENOPTERA"
    if [[ $CUDA == 1 ]]; then ddp_epochs=2; else ddp_epochs=1; fi
    DDP_CHECK_EPOCHS=${DDP_CHECK_EPOCHS:-$ddp_epochs} "$PY" "$ROOT/benchmarks/ddp_check.py" "$HYMENOPTERA" "$WEIGHTS" "$WORK/ddp.json" \
        > "$WORK/ddp.log" 2>&1 && grep '^  ' "$WORK/ddp.log" || { failed "DDP check"; tail -25 "$WORK/ddp.log"; }
fi

# ---- 3. scoring a generated folder with each engine: GPU visible, then CPU only ----------------
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
engine_score() {  # $1: label (device-engine); $2: engine; the rest: environment for the command
    local label=$1 engine=$2
    shift 2
    score "$label" "$WORK/model.pt" "$WORK/images" "$engine" "" "$@"
    [[ -f "$WORK/score-$label.json" ]] && echo "  $label: $(cat "$WORK/score-$label.how"): $(cut -c1-300 "$WORK/score-$label.json")"
    return 0
}
if wanted engines && [[ -f "$WORK/model.pt" ]]; then
    "$PY" "$WORK/make_images.py" "$WORK/images" "$IMAGES"
    echo "== scoring $IMAGES images with each engine"
    if [[ $CUDA == 1 ]]; then
        engine_score gpu torch PATH="$PATH"  # first: float32, the labels the CPU's must equal
        for engine in ${GPU_ENGINES:-auto torch-bf16}; do engine_score "gpu-$engine" "$engine" PATH="$PATH"; done
    fi
    engine_score cpu torch CUDA_VISIBLE_DEVICES=
    for engine in ${CPU_ENGINES:-auto onnx-int8}; do engine_score "cpu-$engine" "$engine" CUDA_VISIBLE_DEVICES=; done
elif wanted engines; then
    echo "== scoring with each engine: skipped (no trained model: step 1 did not run)"
fi

# ---- 4. reference: the model alone, on the JPEG bytes already read -----------------------------
# Decoding on the GPU (nvJPEG) and inference in bf16 there, against CPU decoding and inference
# with all cores: what scoring would reach with no file reads, no job and no Dask.
cat > "$WORK/reference.py" <<'EOF'
import glob, json, os, sys, time
import torch, torchvision
from torchvision.io import decode_jpeg, ImageReadMode
import torchvision.transforms.v2.functional as TF
from retrain.tasks.model_file import load_model_file
loaded = load_model_file(sys.argv[1])
skip = ("corrupt-", "cmyk-", "rotated-")  # what nvJPEG cannot (or should not) decode
files = sorted(f for f in glob.glob(sys.argv[2] + "/**/*.jpg", recursive=True) if not os.path.basename(f).startswith(skip))
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
                x = torch.stack([TF.resize(i, list(size), antialias=True) for i in images])
                model(prep.normalize(x).contiguous(memory_format=torch.channels_last)).float().softmax(1).cpu()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    out[device] = {"images": len(part), "seconds": round(seconds, 2), "images_per_second": round(len(part) / seconds, 1)}
    print(f"  reference, decode + forward on {device}: {len(part) / seconds:8.1f} images/s ({len(part)} images)", flush=True)
print(json.dumps(out))
EOF
if wanted reference; then
    if [[ -f "$WORK/random.pt" ]]; then ref=("$WORK/random.pt" "$WORK/photos"); else ref=("$WORK/model.pt" "$WORK/images"); fi
    echo "== reference: the model alone on ${ref[1]}'s JPEG bytes"
    if [[ -f "${ref[0]}" ]]; then
        "$PY" "$WORK/reference.py" "${ref[@]}" > "$WORK/reference.log" 2>&1 \
            && grep -v '^{' "$WORK/reference.log" && tail -1 "$WORK/reference.log" > "$WORK/reference.json" \
            || { failed "reference"; tail -5 "$WORK/reference.log"; }
    else
        echo "  skipped: no model (steps 0 and 1 did not run)"
    fi
fi

# ---- the table --------------------------------------------------------------------------------
"$PY" - "$WORK" "$RESULTS/gpu_check.json" "$(( $(date +%s) - started ))" "$(IFS=';'; echo "${FAILED[*]:-}")" <<'EOF' || failed "the table"
import json, os, sys
work, out, seconds, failed = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def read(name):
    try:
        return json.load(open(os.path.join(work, name)))
    except (OSError, ValueError):
        return None
train = read("train.json") or {"runs": []}
result = {"photos": read("photos.json"), "training": train, "scoring": {}, "reference": read("reference.json"),
          "ddp": read("ddp.json"), "seconds": seconds, "failed": failed.split(";") if failed else []}
print("\n" + "=" * 78)
for name in sorted(os.listdir(work)):
    label = name[len("score-"):-len(".json")] if name.startswith("score-photos") and name.endswith(".json") else None
    if label and (s := read(name)):
        result["scoring"][label] = s
        print(f"score {s.get('images')} photos, {label[len('photos-'):]}: {s.get('images_per_second_wall')} images/s "
              f"end to end ({s.get('images_per_second')} over the job, {s.get('images_per_second_scoring')} while "
              f"scoring); nvJPEG decoded {s.get('gpu_decoded')}")
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
    if label and label not in ("gpu", "cpu") and not label.startswith("photos"):
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
if g or c:
    how = (result["scoring"].get("cpu") or result["scoring"].get("gpu") or {}).get("how", "not run")
    print(f"{'score ' + str((result['scoring'].get('cpu') or {}).get('images', '?')) + ' images':<44} "
          f"{round(g, 1) if g else '-':>10} {round(c, 1) if c else '-':>10} {f'{g / c:.1f}x' if g and c else '-':>9}")
    print(f"(scoring through {how}; the GPU column is with the GPU visible to it, the CPU column with "
          f"CUDA_VISIBLE_DEVICES=)")
ref = result["reference"] or {}
g, c = ref.get("cuda", {}).get("images_per_second"), ref.get("cpu", {}).get("images_per_second")
print(f"{'reference: decode + model only':<44} {g or '-':>10} {c or '-':>10} {f'{g / c:.1f}x' if g and c else '-':>9}")
ddp = result["ddp"]
if ddp:
    d = ddp["runs"]["ddp"]
    print(f"DDP fine-tune ({d['processes']} x {d['backend']}): {d['images_per_second']} images/s against "
          f"{ddp['runs']['one process']['images_per_second']} in one process; largest weight difference "
          f"{ddp['max_weight_difference']:.3g} of {ddp['max_weight_change']:.3g} moved: {'ok' if ddp['ok'] else 'FAILED'}")
else:
    print("DDP fine-tune: no result (skipped, or see the log above)")
print(f"(whole check {seconds} s; results {out})")
json.dump(result, open(out, "w"), indent=2, default=str)
EOF
if (( ${#FAILED[@]} )); then
    printf 'FAILED steps: %s\n' "$(IFS=';'; echo "${FAILED[*]}")"
    exit 1
fi
