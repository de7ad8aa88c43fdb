# cm: build, run and test.  `make help` lists the targets.
#
# Python comes from Debian's packages (python3-zmq, python3-pymongo, ...),
# which belong to /usr/bin/python3; another python3 first on PATH may lack
# them, so the interpreter is named explicitly.
PYTHON      := /usr/bin/python3
GO          ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
FERRETDB    := .build/cm-ferretdb
NODES       ?= 3
CLUSTER_DIR ?= /tmp/cmcluster-$(shell id -u)
CMCLUSTER   := $(PYTHON) cm/bin/cmcluster
# Debian packages the software and its tests need.
DEBS        := python3-zmq python3-pymongo python3-mongoengine python3-psutil \
               python3-pytest python3-pytest-timeout
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all up down status test unit deps ferretdb help

all: up ## Start a local cluster of NODES compute daemons (default 3) and show it

up: deps ferretdb ## The same as `make`
	@if $(CMCLUSTER) status --dir $(CLUSTER_DIR) >/dev/null 2>&1; then \
	  echo "cm is already running in $(CLUSTER_DIR)"; \
	else \
	  $(CMCLUSTER) up --nodes $(NODES) --dir $(CLUSTER_DIR) >/dev/null; \
	fi
	@CM_SOCKET=$(CLUSTER_DIR)/cm.sock $(PYTHON) cm/bin/cminfo
	@echo
	@echo "Use it from this shell:"
	@echo "  export PATH=$(CURDIR)/cm/bin:\$$PATH CM_SOCKET=$(CLUSTER_DIR)/cm.sock"
	@echo "  cmrun -n 2 -p 2 --wait hostname"

down: ## Stop the local cluster
	$(CMCLUSTER) down --dir $(CLUSTER_DIR)

status: ## Show the local cluster's processes
	$(CMCLUSTER) status --dir $(CLUSTER_DIR)

test: deps ferretdb ## Run every test (installs what is missing first)
	$(PYTHON) -m pytest -p no:cacheprovider --timeout 300 -q tests

unit: ## Only the tests that need no cluster
	$(PYTHON) -m pytest -p no:cacheprovider -q tests/test_units.py tests/test_placement.py \
	  tests/test_jobs.py tests/test_messages.py tests/test_config.py

deps: ## Install the Debian packages cm needs, if any is missing
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@command -v $(GO) >/dev/null 2>&1 || { echo "installing golang-go"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go; }

ferretdb: $(FERRETDB) ## Build the MongoDB-wire server used by local clusters and tests

$(FERRETDB): ferretdb/main.go ferretdb/go.mod ferretdb/go.sum
	cd ferretdb && $(GO) build -trimpath -o ../$(FERRETDB) .

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
