# cm: build, run and test.  `make help` lists the targets.
#
#   make                   a container cluster: a database, the head, NODES compute nodes
#   make exec-head         a shell on the head, as you, in /home/$USER
#   make test              every test (installs what a fresh machine lacks first)
#
# Python comes from Debian's packages (python3-zmq, python3-pymongo, ...),
# which belong to /usr/bin/python3; another python3 first on PATH may lack
# them, so the interpreter is named explicitly.
PYTHON      := /usr/bin/python3
# What `make` runs on the host uses the standard library only (-I -S: no
# site-packages), so a fresh machine needs no Python packages for it: cm's
# own programs run inside the images.
HOST_PYTHON := $(PYTHON) -I -S
GO          ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
NODES       ?= 3
PROJECT     ?= cm
CM_DRIVE    ?= $(CURDIR)/drive
# mongo where the image can be pulled, else FerretDB built here; or say DB=mongo / DB=ferretdb.
DB          ?= auto
MONGO_IMAGE := mongo:7
# ADDRESS:PORT on this host where compute nodes outside the containers reach the head (off if empty).
PUBLISH     ?=
# ADDRESS:PORT on this host where the web dashboard is published (0.0.0.0:8080: to every network).
DASHBOARD   ?= 127.0.0.1:8080
# The names the dashboard answers to (a browser's Host); published elsewhere, add yours, or *.
DASHBOARD_HOSTS ?= localhost,127.0.0.1
CLUSTER_DIR ?= /tmp/cmcluster-$(shell id -u)
USER        ?= $(shell id -un)
# `docker compose` (the plugin) where it exists, else docker-compose.
COMPOSE_BIN := $(shell if docker compose version >/dev/null 2>&1; then echo "docker compose"; else echo docker-compose; fi)
# The compute services compute1 ... computeN, written by `make` (scripts/cluster compose-nodes);
# kept in the drive, so that `make down` and `make logs` act on the nodes the last `make` started.
NODES_FILE   = $(CM_DRIVE)/etc/compose-nodes.yml
COMPOSE      = env CM_DRIVE=$(CM_DRIVE) CM_DB_IMAGE=$(DB_IMAGE) CM_DB_KIND=$(DB_KIND) CM_PUBLISH=$(PUBLISH) CM_DASHBOARD=$(DASHBOARD) CM_DASHBOARD_HOSTS='$(DASHBOARD_HOSTS)' CM_PROJECT=$(PROJECT) CM_DB_URL='$(DB_URL)' \
               $(COMPOSE_BIN) -p $(PROJECT) -f $(CURDIR)/docker-compose.yml -f $(NODES_FILE) \
               $(if $(PUBLISH),-f $(CURDIR)/docker-compose.publish.yml)
FERRETDB    := .build/cm-ferretdb
# The C twin of cm/cman/taskchild.py that starts each task (without it, tasks are forked in Python).
TASK_HELPER := cm/libexec/cm-task
# musl where it is installed: its start-up is cheaper than glibc's (which asks the CPU for its
# features and caches, slow in a virtual machine) and a task pays it once.
TASK_CC     ?= $(shell command -v musl-gcc 2>/dev/null || echo cc)
DEBS        := python3-zmq python3-pymongo python3-mongoengine python3-psutil \
               python3-pytest python3-pytest-timeout python3-docker docker-compose mmdebstrap gcc libc6-dev musl-tools \
               libjs-chart.js chromium python3-websocket
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Which database image: decided once per make run, only by targets that need it.
DB_KIND      = $(eval DB_KIND := $(shell DB=$(DB) MONGO_IMAGE=$(MONGO_IMAGE) scripts/choose-db))$(DB_KIND)
DB_IMAGE     = $(if $(filter mongo,$(DB_KIND)),$(MONGO_IMAGE),cm-ferretdb:latest)
# mongo checks credentials; FerretDB does not, so the head reaches it on a socket only root may use.
DB_URL       = $(if $(filter mongo,$(DB_KIND)),mongodb://cm@db:27017/cm?authSource=admin,mongodb://%2Frun%2Fcm-db%2Fdb.sock/cm)

.PHONY: all up images keys node-keys host-tools exec-head down clean logs test unit deps ferretdb helper local local-down bench replay help

all: up ## Start the container cluster (NODES compute nodes, default 3) and show it

up: images keys ## The same as `make`
	@mkdir -p $(CM_DRIVE)/home $(CM_DRIVE)/etc $(CM_DRIVE)/db/$(DB_KIND)
	@test -e $(CM_DRIVE)/etc/users || printf '%s\n' \
	  '# The cluster'"'"'s users, one "name:uid:gid" a line, created identically on every' \
	  '# node when it starts. `make exec-head` adds you if you are missing.' > $(CM_DRIVE)/etc/users
	@$(HOST_PYTHON) scripts/cluster compose-nodes --nodes $(NODES) --project $(PROJECT) --out $(NODES_FILE)
	$(COMPOSE) up -d --remove-orphans
	@$(HOST_PYTHON) scripts/cluster wait-nodes --nodes $(NODES) -- $(COMPOSE)
	@$(COMPOSE) exec -T head cminfo
	@echo "dashboard http://$(DASHBOARD)/"

# The cluster's CURVE keys in drive/keys: the head's, and a pair per compute node bound to its
# name. cmkeys makes them inside the head's image (it needs pyzmq, which the host may lack), as
# root: they are root's alone, and each container mounts only its own directory, read-only, so no
# user's job can read a key. Keys that exist are kept (make NODES=5 adds compute4's and compute5's).
# drive/etc/keys is the layout before per-node keys (one secret for all, where jobs could read it).
keys: images
	@mkdir -p $(CM_DRIVE)
	-@rm -rf $(CM_DRIVE)/etc/keys
	@docker run --rm -v $(CM_DRIVE):/drive --entrypoint /opt/cm/bin/cmkeys cm-head:latest \
	  --database /drive/keys $(addprefix compute,$(shell seq 1 $(NODES))) | sed 's|/drive/keys|$(CM_DRIVE)/keys|'

# Keys for one more compute node, outside the containers (README: Compute nodes outside containers).
node-keys: images ## Keys for a compute node outside the containers: make node-keys NODE=name
	@test -n "$(NODE)" || { echo "make: say which node: make node-keys NODE=name" >&2; exit 2; }
	@docker run --rm -v $(CM_DRIVE):/drive --entrypoint /opt/cm/bin/cmkeys cm-head:latest /drive/keys $(NODE) \
	  | sed 's|/drive/keys|$(CM_DRIVE)/keys|'
	@echo "copy $(CM_DRIVE)/keys/$(NODE) to /etc/cm/keys on $(NODE) (as root, mode 0700)"

# What the host needs for the container cluster: Docker with Compose, and Python 3 for scripts/
# (the standard library only). Python is installed where it is missing; Docker cannot be.
host-tools:
	@command -v docker >/dev/null 2>&1 || { echo "make: this needs Docker with Compose (docker.io and docker-compose, or Docker's docker-ce with the compose plugin)" >&2; exit 1; }
	@$(COMPOSE_BIN) version >/dev/null 2>&1 || { echo "make: this needs Docker Compose: the docker compose plugin, or docker-compose (apt-get install docker-compose)" >&2; exit 1; }
	@test -x $(PYTHON) || { echo "installing python3"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null; }

# Written when missing, for the targets other than up (up writes it for NODES every time).
$(NODES_FILE): | host-tools
	@mkdir -p $(CM_DRIVE)/etc
	@$(HOST_PYTHON) scripts/cluster compose-nodes --nodes $(NODES) --project $(PROJECT) --out $(NODES_FILE)

# The base image is made again when its package list changes (its label holds the list's hash).
BASE_FRESH   = [ "$$(docker image inspect -f '{{index .Config.Labels "org.cm.packages"}}' cm-base:latest 2>/dev/null)" \
               = "$$(sha256sum baseimage/packages | cut -c1-16)" ]

images: host-tools helper $(if $(filter ferretdb,$(DB_KIND)),ferretdb-image) ## Build the images that are missing or out of date
	@$(BASE_FRESH) || baseimage/build cm-base:latest
	@scripts/build-image -t cm-head:latest -f headnode/Dockerfile .
	@scripts/build-image -t cm-compute:latest -f computenode/Dockerfile .

ferretdb-image: $(FERRETDB)
	@$(BASE_FRESH) || baseimage/build cm-base:latest
	@scripts/build-image -t cm-ferretdb:latest -f ferretdb/Dockerfile .build

# As the user, at home on the shared /home (root's too: /root is not shared), with the
# variables a login sets (docker exec sets none of them).
EXEC_AS = -u $(USER) -w /home/$(USER) -e HOME=/home/$(USER) -e USER=$(USER) -e LOGNAME=$(USER)
# CMD reaches the shell through the environment, unexpanded by make ($ and quotes survive).
exec-head: override export CMD := $(value CMD)
exec-head: | $(NODES_FILE) ## A shell on the head as $USER in /home/$USER; CMD='...' runs that command instead
	@$(HOST_PYTHON) scripts/cluster add-user --user $(USER) -- $(COMPOSE)
	@if [ -n "$$CMD" ]; then \
	  $(COMPOSE) exec -T $(EXEC_AS) head bash -l -c "$$CMD"; \
	else \
	  $(COMPOSE) exec $(EXEC_AS) head bash -l; \
	fi

down: | $(NODES_FILE) ## Stop the cluster; its containers, jobs and nodes stay for the next `make`
	$(COMPOSE) stop

clean: | $(NODES_FILE) ## Remove the containers, the project's images and the database's data
	-$(COMPOSE) down --remove-orphans --volumes
	-docker image rm cm-head:latest cm-compute:latest cm-ferretdb:latest cm-base:latest 2>/dev/null
	-docker image prune -f --filter label=org.cm.image=true >/dev/null
	rm -rf $(CM_DRIVE)/db/mongo $(CM_DRIVE)/db/ferretdb
	@# The compute nodes' cgroups on this host (root's to remove; empty once the nodes are gone).
	@if [ "$$(id -u)" = 0 ]; then find /sys/fs/cgroup/*/cm/$(PROJECT) -depth -type d -exec rmdir {} + 2>/dev/null; true; fi

logs: | $(NODES_FILE) ## The daemons' recent logs (the database's: make logs SERVICE=db)
	@$(COMPOSE) logs --no-color --tail=100 $(or $(SERVICE),head $(shell sed -n 's/^ *"\(compute[0-9]*\)": {/\1/p' $(NODES_FILE)))

test: deps ferretdb $(TASK_HELPER) ## Run every test (installs what is missing first)
	$(PYTHON) -m pytest -p no:cacheprovider --timeout 900 -q tests

unit: ## Only the tests that need no cluster
	$(PYTHON) -m pytest -p no:cacheprovider -q tests/test_units.py tests/test_placement.py \
	  tests/test_jobs.py tests/test_messages.py tests/test_config.py tests/test_users.py tests/test_cli.py \
	  tests/test_core.py

bench: deps ferretdb $(TASK_HELPER) ## cm against Slurm on this machine (QUICK=1: a few minutes; CM_ONLY=1: without Slurm)
	@$(if $(CM_ONLY),,dpkg -s slurm-wlm munge >/dev/null 2>&1 || { echo "installing slurm-wlm munge"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; })
	$(PYTHON) bench/run.py $(if $(QUICK),--quick) $(if $(CM_ONLY),--cm-only)

# A window of an SWF log replayed with fifo and with backfill (bench/replay.py --help for more).
TRACE       ?= $(CURDIR)/../shared/traces/KTH-SP2-1996-2.1-cln.swf.gz
REPLAY_ARGS ?= --first 0 --count 500 --compression 1000

replay: deps ferretdb $(TASK_HELPER) ## Replay a real workload (TRACE=log.swf.gz REPLAY_ARGS=...) with fifo and backfill
	$(PYTHON) bench/replay.py --trace $(TRACE) $(REPLAY_ARGS)
	$(PYTHON) bench/passes.py

local: deps ferretdb helper ## A cluster of local processes instead of containers (cmcluster)
	@$(PYTHON) cm/bin/cmcluster status --dir $(CLUSTER_DIR) >/dev/null 2>&1 \
	  || $(PYTHON) cm/bin/cmcluster up --nodes $(NODES) --dir $(CLUSTER_DIR) >/dev/null
	@CM_SOCKET=$(CLUSTER_DIR)/cm.sock $(PYTHON) cm/bin/cminfo
	@$(PYTHON) cm/bin/cmcluster status --dir $(CLUSTER_DIR) | grep '^dashboard ' || true
	@echo "Use it from this shell:"
	@echo "  export PATH=$(CURDIR)/cm/bin:\$$PATH CM_SOCKET=$(CLUSTER_DIR)/cm.sock"

local-down: | $(NODES_FILE) ## Stop the local-process cluster
	$(PYTHON) cm/bin/cmcluster down --dir $(CLUSTER_DIR)

deps: ## Install the Debian packages cm needs, if any is missing
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing" $$missing; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v $(GO) >/dev/null 2>&1 || { echo "installing golang-go"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null; }

ferretdb: $(FERRETDB) ## Build the MongoDB-wire server used by local clusters, tests and the offline image

# Static (no cgo), so the same binary runs on the host and in the image.
$(FERRETDB): ferretdb/main.go ferretdb/go.mod ferretdb/go.sum
	@command -v $(GO) >/dev/null 2>&1 || { echo "make: building FerretDB needs Go 1.24 or later (GO=/path/to/go), or DB=mongo where the mongo image can be pulled" >&2; exit 1; }
	cd ferretdb && CGO_ENABLED=0 $(GO) build -trimpath -o ../$(FERRETDB) .

helper: ## Build cm-task, which starts each task (installs a C compiler where apt-get can; else warns)
	@if ! command -v $(TASK_CC) >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing gcc libc6-dev musl-tools (to build cm-task)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev musl-tools >/dev/null; \
	fi
	@if command -v musl-gcc >/dev/null 2>&1 || command -v $(TASK_CC) >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory -q $(TASK_HELPER) || $(MAKE) --no-print-directory $(TASK_HELPER); \
	else echo "make: no C compiler ($(TASK_CC)): cm-task not built; compute nodes fork their tasks in Python, which costs more CPU per task" >&2; fi

# Static: the same binary runs on the host and in the compute image, whatever the host's C library.
$(TASK_HELPER): cm/libexec/cm-task.c
	$(TASK_CC) -O2 -Wall -Wextra -static -o $@ $<

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/^all:/:/' | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "Variables: NODES=3 (compute nodes), DB=auto|mongo|ferretdb, USER=you (exec-head),"
	@echo "  CMD='...' (exec-head), PUBLISH=ADDR:PORT (the head's port for outside nodes),"
	@echo "  PROJECT=cm and CM_DRIVE=./drive (a second, separate cluster)"
