"""The `sdlive` command line."""
def main() -> None:
    print("sdlive")
