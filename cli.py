import click


@click.group()
def main():
    """sdport: Stable Diffusion porting toolkit."""
