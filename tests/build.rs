//! `tests/tests/dashboards.rs` embeds the migrations with `sqlx::migrate!("../migrations")`;
//! watching the folder makes a new migration rebuild it (see coordinator/build.rs).

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
