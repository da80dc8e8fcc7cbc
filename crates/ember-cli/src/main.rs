fn main() {
    std::process::exit(ember_cli::main())
}
