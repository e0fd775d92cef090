fn main() {
    println!("nsmatrix");
}
