# The two commands of the README:
#   make demo   installs what is needed, builds (Release) and runs the main job
#   make test   installs what is needed, checks the formatting, builds (warnings are errors), runs the whole
#               test suite, then builds and runs the torch-free kernel and file-format tests under
#               AddressSanitizer + UndefinedBehaviorSanitizer (scripts/sanitize.sh)
BUILD ?= build
JOBS  ?= $(shell nproc)

.PHONY: demo test setup configure build format-check sanitize clean

setup:
	@bash scripts/setup.sh

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

configure: setup
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null

demo: configure
	@cmake --build $(BUILD) -j $(JOBS) --target grape_cli
	$(BUILD)/grape compare --out grape-compare

format-check: setup
	@bash scripts/check_format.sh

sanitize: setup
	@bash scripts/sanitize.sh

test: format-check build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)
	@bash scripts/sanitize.sh

clean:
	rm -rf $(BUILD) build-sanitize
