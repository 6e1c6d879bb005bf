# The two commands of the README:
#   make demo   installs what is needed, builds (Release) and runs the main job
#   make test   installs what is needed, builds and runs the whole test suite
BUILD ?= build
JOBS  ?= $(shell nproc)

.PHONY: demo test setup build clean

setup:
	@bash scripts/setup.sh

build: setup
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

demo: build
	$(BUILD)/grape check

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD)
