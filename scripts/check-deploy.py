#!/usr/bin/env python3
"""Validate what can be validated of deploy/ and docker-compose.yml on a machine
without a Docker engine or a Kubernetes cluster:

- Kubernetes manifests against the Kubernetes schemas (kubernetes-validate,
  strict), and the CRDs we use (ServiceMonitor, KEDA) against the schema subsets
  in deploy/k8s/schemas/;
- docker-compose.yml parses, every file it mounts or builds from exists, every
  dependency names a service;
- every LESSON_REPLAY_* setting in the compose file and the Kubernetes
  ConfigMap/Secret is accepted by the real binary (`lesson-replay config`);
- the pods' termination grace periods exceed the worker's own grace, and the
  ingress's drain and a last request.
"""
import glob, json, os, subprocess, sys

import jsonschema
import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
BINARY = os.environ.get("LESSON_REPLAY_BIN", os.path.join(ROOT, "target", "debug", "lesson-replay"))
errors = []


def fail(message):
    errors.append(message)
    print(f"FAIL {message}", file=sys.stderr)


def check_k8s():
    k8s = os.path.join(ROOT, "deploy", "k8s")
    crd_schemas = {
        os.path.splitext(os.path.basename(p))[0]: json.load(open(p))
        for p in glob.glob(os.path.join(k8s, "schemas", "*.json"))
    }
    core_files = []
    for path in sorted(glob.glob(os.path.join(k8s, "*.yaml"))):
        if os.path.basename(path) == "kustomization.yaml":
            continue
        docs = [d for d in yaml.safe_load_all(open(path)) if d]
        crds = [d for d in docs if d["kind"].lower() in crd_schemas]
        for doc in crds:
            try:
                jsonschema.validate(doc, crd_schemas[doc["kind"].lower()])
            except jsonschema.ValidationError as e:
                fail(f"{os.path.relpath(path, ROOT)}: {doc['kind']}: {e.message}")
        if len(crds) < len(docs):
            core_files.append(path)
    result = subprocess.run(["kubernetes-validate", "--strict", "--quiet", *core_files], capture_output=True, text=True)
    if result.returncode != 0:
        fail("kubernetes-validate:\n" + result.stdout + result.stderr)
    listed = yaml.safe_load(open(os.path.join(k8s, "kustomization.yaml")))["resources"]
    for resource in listed:
        if not os.path.exists(os.path.join(k8s, resource)):
            fail(f"kustomization.yaml lists a missing file: {resource}")

    config = yaml.safe_load(open(os.path.join(k8s, "configmap.yaml")))["data"]
    secret = yaml.safe_load(open(os.path.join(k8s, "secret.example.yaml")))["stringData"]
    check_settings("deploy/k8s ConfigMap + Secret", {**config, **secret}, apps=2)
    deployment = yaml.safe_load(open(os.path.join(k8s, "deployment.yaml")))
    pod_grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    worker_grace = int(config.get("LESSON_REPLAY_SHUTDOWN_GRACE_SECS", "25"))
    if pod_grace <= worker_grace + 5:
        fail(f"terminationGracePeriodSeconds {pod_grace} leaves no time after the worker's {worker_grace} s")
    ingress = yaml.safe_load(open(os.path.join(k8s, "ingress-deployment.yaml")))
    ingress_grace = ingress["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = int(config.get("LESSON_REPLAY_INGRESS_DRAIN_SECS", "15"))
    request = int(config.get("LESSON_REPLAY_INGRESS_REQUEST_TIMEOUT_MS", "10000")) / 1000
    if ingress_grace <= drain + request:
        fail(f"the ingress's terminationGracePeriodSeconds {ingress_grace} does not cover its drain ({drain} s) and a last request ({request} s)")


def check_settings(where, env, apps=0):
    settings = {k: str(v) for k, v in env.items() if k.startswith("LESSON_REPLAY_")}
    result = subprocess.run([BINARY, "config"], env={"PATH": os.environ["PATH"], **settings}, capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"{where}: settings rejected by lesson-replay: {result.stderr.strip()}")
        return
    shown = json.loads(result.stdout)
    if len(shown.get("apps", {})) != apps:
        fail(f"{where}: {len(shown.get('apps', {}))} apps configured, the example shows {apps}")
    for secret in (v for k, v in settings.items() if k.endswith(("_KEY", "_ACCESS_KEY_ID")) and len(v) > 8):
        if secret in result.stdout:
            fail(f"{where}: `lesson-replay config` shows a secret")


def env_file(path):
    """The variables of a compose env_file."""
    pairs = (line.split("=", 1) for line in open(os.path.join(ROOT, path)) if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def check_compose():
    path = os.path.join(ROOT, "docker-compose.yml")
    compose = yaml.safe_load(open(path))
    services = compose["services"]
    for name, service in services.items():
        if "image" not in service and "build" not in service:
            fail(f"compose service {name}: neither image nor build")
        build = service.get("build")
        if build:
            context = os.path.join(ROOT, build.get("context", ".") if isinstance(build, dict) else build)
            dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
            if not os.path.exists(os.path.join(context, dockerfile)):
                fail(f"compose service {name}: missing {dockerfile} in {context}")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")) and not os.path.exists(os.path.join(ROOT, source)):
                fail(f"compose service {name}: mounts missing {source}")
        depends = service.get("depends_on", [])
        for dependency in depends if isinstance(depends, list) else depends.keys():
            if dependency not in services:
                fail(f"compose service {name}: depends on unknown service {dependency}")
    worker = services["worker"]
    files = worker.get("env_file", [])
    merged = dict(worker["environment"])
    for path in [files] if isinstance(files, str) else files:
        merged.update(env_file(path))
    check_settings("docker-compose.yml worker", merged, apps=2)
    dockerfile = open(os.path.join(ROOT, "Dockerfile")).read()
    if "\nUSER " not in dockerfile or "USER root" in dockerfile:
        fail("Dockerfile: the runtime stage must run as a non-root USER")
    example = json.load(open(os.path.join(ROOT, "examples", "compose", "lesson.json")))
    for video in example["video_info"]:
        name = video["video_url"].rsplit("/", 1)[1]
        fixture = os.path.join(ROOT, "tests", "fixtures", name)
        if not os.path.exists(fixture) or os.path.getsize(fixture) != video["video_size"]:
            fail(f"examples/compose/lesson.json: {name} does not match tests/fixtures (served by the vod service)")


def check_docker_build():
    """Replay the build stage's COPY lines into an empty directory and build
    there: a file the image build needs but does not copy fails here."""
    import re, shutil, tempfile
    dockerfile = open(os.path.join(ROOT, "Dockerfile")).read()
    build_stage = re.split(r"^FROM ", dockerfile, flags=re.M)[1]
    with tempfile.TemporaryDirectory() as tmp:
        for line in build_stage.splitlines():
            m = re.match(r"COPY\s+(?!--)(.+)\s+(\S+)$", line.strip())
            if not m:
                continue
            sources, dest = m.group(1).split(), m.group(2)
            for source in sources:
                src = os.path.join(ROOT, source)
                target = os.path.join(tmp, dest if dest not in ("./", ".") else source)
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(tmp, dest.rstrip("/")) if dest not in ("./", ".") else target)
                else:
                    shutil.copy(src, os.path.join(tmp, os.path.basename(source)) if dest in ("./", ".") else target)
        result = subprocess.run(
            ["cargo", "build", "--locked", "--quiet", "--bin", "lesson-replay"],
            cwd=tmp, env={**os.environ, "CARGO_TARGET_DIR": os.path.join(ROOT, "target")},
            capture_output=True, text=True)
        if result.returncode != 0:
            fail("the Dockerfile's build stage does not build:\n" + result.stderr[-2000:])


check_k8s()
check_compose()
check_docker_build()
if errors:
    sys.exit(f"{len(errors)} deployment check(s) failed")
print("deploy/ and docker-compose.yml: all checks passed")
