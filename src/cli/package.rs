//! What the Debian package ships besides the binary, generated from the
//! settings declaration and the command-line definition so that new settings
//! and subcommands reach the package by themselves: the commented config file
//! (`keyhaven config-template` prints the same with the built-in defaults), man
//! pages (`clap_mangen`) and bash/zsh/fish completions (`clap_complete`).
//! `scripts/build-deb.sh` runs the hidden `keyhaven package-files DIR`.

use std::path::Path;

use clap_complete::Shell;

/// The data directory named in the package's config file (its postinst creates it, 0711).
pub const PACKAGE_DATA_DIR: &str = "/var/lib/keyhaven";

/// Write `DIR/keyhaven.toml`, `DIR/man/*.1` and `DIR/completions/{keyhaven.bash,_keyhaven,keyhaven.fish}`.
pub fn write(dir: &Path, cmd: clap::Command) -> Result<(), String> {
    let io = |what: &str, e: std::io::Error| format!("cannot write {what} under {}: {e}", dir.display());
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).map_err(|e| io("a folder", e))?;
    }
    let config = keyhaven_server::config::toml_template(&[("data_dir", PACKAGE_DATA_DIR)]);
    std::fs::write(dir.join("keyhaven.toml"), config).map_err(|e| io("keyhaven.toml", e))?;
    clap_mangen::generate_to(cmd.clone(), &man).map_err(|e| io("the man pages", e))?;
    let mut cmd = cmd;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "keyhaven", &completions)
            .map_err(|e| io("the shell completions", e))?;
    }
    Ok(())
}
