//! `sqlx::migrate!("../migrations")` embeds the migrations when the crate compiles, but cargo
//! does not know the folder is an input: a new migration file alone would leave a coordinator
//! built without it. Watching the folder makes adding, editing or removing one rebuild the crate
//! (sqlx's documented remedy).

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
