fn main() { println!("eslm-train (in progress)"); }
