#!/usr/bin/env python3
"""A small moelora client in Python: optionally attaches an expert through the Admin service,
then streams a Generate call showing each token's routing weights.

Needs the generated stubs (built into <build>/python by CMake) and grpcio + protobuf for Python
(Debian: python3-grpcio python3-protobuf). Example:

    PYTHONPATH=build/python python3 client/python/example_client.py \
        --prompt_ids 1,2,3 --max_new_tokens 8 --router mix \
        --attach math=/srv/adapters/math --admin_token_file /etc/moelora/admin.token
"""

import argparse
import sys

import grpc

from moelora.v1 import admin_pb2, admin_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc


def parse_ids(text):
    return [int(part) for part in text.split(",") if part.strip()]


def parse_weights(text):
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition(":")
        weights[name.strip()] = float(value)
    return weights


def attach_expert(args):
    """Admin.AttachExpert with the bearer token as call metadata."""
    name, _, path = args.attach.partition("=")
    metadata = []
    if args.admin_token_file:
        with open(args.admin_token_file) as f:
            metadata.append(("authorization", "Bearer " + f.read().strip()))
    with grpc.insecure_channel(args.admin_address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        info = admin.AttachExpert(
            admin_pb2.AttachExpertRequest(name=name, path=path),
            metadata=metadata,
            timeout=args.timeout,
        )
        print(f"attached {info.name}: slot {info.slot}, rank {info.rank}, "
              f"{info.num_modules} modules ({','.join(info.target_modules)})")
        listing = admin.ListExperts(admin_pb2.ListExpertsRequest(), metadata=metadata,
                                    timeout=args.timeout)
        print("experts:", ", ".join(e.name for e in listing.experts),
              f"({listing.free_slots} free slots)")


def generate(args):
    """Inference.Generate, printing tokens and per-token routing as they stream in."""
    routing = common_pb2.RoutingControls(
        router=args.router,
        pinned_expert=args.pin,
        expert_weights=parse_weights(args.weights),
        masked_experts=[m for m in args.mask.split(",") if m],
    )
    if args.route_top_k is not None:
        routing.top_k = args.route_top_k  # optional field: set only when given
    request = inference_pb2.GenerateRequest(
        sampling=inference_pb2.SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        ),
        routing=routing,
        return_routing=True,
    )
    if args.prompt is not None:
        request.prompt_text = args.prompt
    else:
        request.prompt_token_ids.extend(parse_ids(args.prompt_ids))

    with grpc.insecure_channel(args.address) as channel:
        inference = inference_pb2_grpc.InferenceStub(channel)
        experts = []
        for message in inference.Generate(request, timeout=args.timeout):
            if message.routing_experts:  # the first message names the columns
                experts = list(message.routing_experts)
            for i, token in enumerate(message.token_ids):
                weights = ""
                if i < len(message.routing):
                    weights = " ".join(f"{name}={w:.2f}"
                                       for name, w in zip(experts, message.routing[i].weights))
                print(f"token {token}  {weights}", flush=True)
            if message.text:
                print(f"  text: {message.text!r}", flush=True)
            if message.finish_reason:  # the last message
                u = message.usage
                reason = inference_pb2.FinishReason.Name(message.finish_reason)
                print(f"finish={reason} tokens={u.generated_tokens} prompt={u.prompt_tokens} "
                      f"ttft={u.time_to_first_token_seconds * 1e3:.1f}ms "
                      f"total={u.total_seconds * 1e3:.1f}ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="localhost:50051")
    parser.add_argument("--admin_address", default="localhost:50052")
    parser.add_argument("--admin_token_file", default="")
    parser.add_argument("--attach", default="", help="NAME=SERVER_DIR: attach this expert first")
    parser.add_argument("--prompt_ids", default="1,2,3")
    parser.add_argument("--prompt", default=None, help="text prompt (server needs a tokenizer)")
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--router", default="")
    parser.add_argument("--pin", default="")
    parser.add_argument("--weights", default="", help="e.g. math:0.3,code:0.7")
    parser.add_argument("--mask", default="")
    parser.add_argument("--route_top_k", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    args = parser.parse_args()
    try:
        if args.attach:
            attach_expert(args)
        generate(args)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
