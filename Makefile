# The two commands of the README:
#   make demo   installs what is needed, builds (Release) and runs the main job
#   make test   installs what is needed, builds and runs the whole test suite
BUILD ?= build
JOBS  ?= $(shell nproc)

.PHONY: demo test setup configure build clean

setup:
	@bash scripts/setup.sh

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

configure: setup
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null

demo: configure
	@cmake --build $(BUILD) -j $(JOBS) --target grape_cli
	$(BUILD)/grape compare --out grape-compare

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD)
