#!/usr/bin/env python3
"""A small Dockerfile linter for the rules this project cares about (hadolint is not in Debian).

  dockerfile_check.py DOCKERFILE     check a Dockerfile; prints each problem, exits 1 if any
  dockerfile_check.py --self-test    check the checker against good and bad snippets

Rules
  DF1  multi-stage: at least two FROM instructions
  DF2  every FROM image is pinned by a tag or digest (not bare, not :latest); ARG defaults
       declared before the first FROM are substituted; FROM <earlier stage> is fine
  DF3  the final stage sets a USER that is not root (name or uid 0)
  DF4  HEALTHCHECK present (and not NONE) in the final stage
  DF5  the final stage EXPOSEs 50051, 50052 and 9090
  DF6  every `apt-get install` uses --no-install-recommends, and its RUN removes
       /var/lib/apt/lists
  DF7  no ADD of a URL (fetch in RUN with a checksum, or COPY from the build context)
Python 3 standard library only.
"""
import re
import shlex
import sys

REQUIRED_PORTS = {"50051", "50052", "9090"}


def instructions(text):
    """[(line number, INSTRUCTION, arguments)], continuations joined, comments dropped."""
    result = []
    current, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if not current:
            start = number
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        result.append((start, keyword.upper(), rest.strip()))
        current = ""
    if current:
        keyword, _, rest = current.partition(" ")
        result.append((start, keyword.upper(), rest.strip()))
    return result


def substitute(value, args):
    def replace(match):
        name = match.group(1) or match.group(2)
        return args.get(name, match.group(0))
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-+][^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)",
                  replace, value)


def pinned(image):
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.split(":", 1)[1]
    return bool(tag) and tag != "latest" and "$" not in tag


def words(arguments):
    """Arguments of an exec-form (JSON) or shell-form instruction as words."""
    arguments = arguments.strip()
    if arguments.startswith("["):
        return re.findall(r'"((?:[^"\\]|\\.)*)"', arguments)
    try:
        return shlex.split(arguments)
    except ValueError:
        return arguments.split()


def check(text):
    problems = []
    global_args = {}
    stages = []  # [{"name", "line", "instructions": [...]}]
    for line, keyword, arguments in instructions(text):
        if keyword == "ARG" and not stages:
            name, _, default = arguments.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
            continue
        if keyword == "FROM":
            parts = [w for w in arguments.split() if not w.startswith("--")]
            image = substitute(parts[0], global_args) if parts else ""
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            earlier = {s["name"] for s in stages if s["name"]}
            if image not in earlier and image != "scratch" and not pinned(image):
                problems.append(f"line {line}: DF2 FROM {parts[0] if parts else ''} "
                                f"(= {image}) is not pinned by a tag or digest")
            stages.append({"name": name, "line": line, "instructions": []})
            continue
        if not stages:
            problems.append(f"line {line}: {keyword} before the first FROM")
            continue
        stages[-1]["instructions"].append((line, keyword, arguments))

        if keyword == "ADD":
            for word in words(arguments):
                if re.match(r"^(https?|ftp)://", word):
                    problems.append(f"line {line}: DF7 ADD of a URL ({word})")
        if keyword == "RUN":
            for command in re.split(r"&&|;|\|\||\bthen\b|\belse\b", arguments):
                if re.search(r"\bapt-get\b.*\binstall\b", command):
                    if "--no-install-recommends" not in command:
                        problems.append(f"line {line}: DF6 apt-get install without "
                                        "--no-install-recommends")
            if re.search(r"\bapt-get\b.*\binstall\b", arguments):
                if not re.search(r"rm\s+-(rf|fr|r)\s+/var/lib/apt/lists", arguments):
                    problems.append(f"line {line}: DF6 apt-get install in a RUN that does not "
                                    "rm -rf /var/lib/apt/lists/*")

    if len(stages) < 2:
        problems.append(f"DF1 not multi-stage: {len(stages)} FROM instruction(s)")
    if not stages:
        return problems
    final = stages[-1]
    users = [(l, a) for l, k, a in final["instructions"] if k == "USER"]
    if not users:
        problems.append(f"line {final['line']}: DF3 the final stage sets no USER (runs as root)")
    else:
        line, user = users[-1]
        name = user.split(":", 1)[0].strip()
        if name in ("root", "0", ""):
            problems.append(f"line {line}: DF3 the final stage runs as root (USER {user})")
    checks = [(l, a) for l, k, a in final["instructions"] if k == "HEALTHCHECK"]
    if not checks:
        problems.append(f"line {final['line']}: DF4 the final stage has no HEALTHCHECK")
    elif checks[-1][1].strip().upper() == "NONE":
        problems.append(f"line {checks[-1][0]}: DF4 HEALTHCHECK NONE")
    exposed = set()
    for _, keyword, arguments in final["instructions"]:
        if keyword == "EXPOSE":
            exposed.update(w.split("/")[0] for w in arguments.split())
    missing = REQUIRED_PORTS - exposed
    if missing:
        problems.append(f"line {final['line']}: DF5 the final stage does not EXPOSE "
                        f"{', '.join(sorted(missing))}")
    return problems


GOOD = """\
ARG BASE=debian:12
FROM ${BASE} AS build
RUN apt-get update \\
 && apt-get install -y --no-install-recommends cmake \\
 && rm -rf /var/lib/apt/lists/*
FROM debian:12-slim
COPY --from=build /x /x
USER 10001:10001
EXPOSE 50051 50052 9090
HEALTHCHECK CMD ["/x", "health"]
"""

BAD = {
    "DF1": "FROM debian:12\nUSER 1\nEXPOSE 50051 50052 9090\nHEALTHCHECK CMD x\n",
    "DF2": GOOD.replace("ARG BASE=debian:12", "ARG BASE=debian"),
    "DF3": GOOD.replace("USER 10001:10001", "USER root"),
    "DF4": GOOD.replace('HEALTHCHECK CMD ["/x", "health"]', ""),
    "DF5": GOOD.replace("EXPOSE 50051 50052 9090", "EXPOSE 50051"),
    "DF6": GOOD.replace(" --no-install-recommends", ""),
    "DF6 ": GOOD.replace(" \\\n && rm -rf /var/lib/apt/lists/*", ""),
    "DF7": GOOD.replace("COPY --from=build /x /x", "ADD https://example.com/x.tgz /x"),
}


def self_test():
    failures = []
    if check(GOOD):
        failures.append(f"good Dockerfile flagged: {check(GOOD)}")
    latest = GOOD.replace("debian:12-slim", "debian:latest")
    if not any("DF2" in p for p in check(latest)):
        failures.append("DF2: FROM debian:latest not flagged")
    for rule, text in BAD.items():
        problems = check(text)
        if not any(rule.strip() in p for p in problems):
            failures.append(f"{rule.strip()}: not flagged; got {problems}")
    for failure in failures:
        print(failure)
    print("self-test", "FAILED" if failures else "OK")
    return 1 if failures else 0


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    path = sys.argv[1]
    problems = check(open(path, encoding="utf-8").read())
    for problem in problems:
        print(f"{path}: {problem}")
    if not problems:
        print(f"{path}: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
