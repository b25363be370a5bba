"""`d4ir shards verify` and `d4ir shards merge`."""

from __future__ import annotations

import click

from d4ir_pipeline.shardset.reader import verify_shardset
from d4ir_pipeline.shardset.writer import merge_shardset


@click.group("shards")
def shards_group() -> None:
    """Verify or merge a shard set."""


@shards_group.command("verify")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--quick", is_flag=True, help="Only hash the files; do not open the tars.")
def verify_command(directory: str, quick: bool) -> None:
    """Re-hash every shard listed in DIRECTORY/shardset.json and report damage (exit 1 if any)."""
    rep = verify_shardset(directory, deep=not quick)
    for line in rep.damaged:
        click.echo(f"DAMAGED {line}")
    for name in rep.unlisted:
        click.echo(f"unlisted {name} (not in the manifest; synthesize two ignores it)")
    for name in rep.leftovers:
        click.echo(f"leftover {name} (an interrupted write; the next run removes it)")
    state = "complete" if rep.complete else "INCOMPLETE"
    click.echo(f"{rep.shards} shards, {rep.samples} samples, {len(rep.damaged)} damaged; set {state}")
    if not rep.ok:
        click.echo("rerun the synthesize command that wrote it: damaged shards are redone", err=True)
        raise SystemExit(1)
    if not rep.complete:
        raise SystemExit(1)


@shards_group.command("merge")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
def merge_command(directory: str) -> None:
    """Merge the per-rank manifests of DIRECTORY into shardset.json (after every rank finished)."""
    doc = merge_shardset(directory)
    click.echo(
        f"{doc['num_shards']}/{doc['num_shards_planned']} shards, {doc['num_samples']} samples; "
        + ("complete" if doc["complete"] else f"INCOMPLETE (pending ranks {doc.get('pending_ranks')})")
    )
    if not doc["complete"]:
        raise SystemExit(1)
