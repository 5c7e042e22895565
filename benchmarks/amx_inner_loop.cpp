// The AMX kernel's inner loop alone (benchmarks/kernel_paths.py times the real kernels): where its time goes
// and four arrangements of it, on synthetic codes (96 weight tiles x 18 blocks, 32 columns: Q4_0/Q5_0's
// 1536 x 576 after widening). Needs an AMX CPU and Linux >= 5.16.
//
//   g++ -O3 -std=c++17 -march=sapphirerapids benchmarks/amx_inner_loop.cpp -o /tmp/amx_inner_loop && /tmp/amx_inner_loop
//
// full: qk_amx.cpp's loop (two tile sets alternating, the next block's multiply before this block's
// scaling); tileonly / epionly: its tile operations / its float work alone; 2g: both column groups share
// the B tile; 2t: two weight tiles share the A tile; 2x2: llama.cpp's blocking (4 C tiles), accumulators
// in memory. Best of 20 runs of 10 calls, ms per call.
#include <immintrin.h>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <chrono>
#include <vector>
#include <unistd.h>
#include <sys/syscall.h>
struct TileConfig { uint8_t palette=1, start_row=0; uint8_t reserved[14]={}; uint16_t colsb[16]={}; uint8_t rows[16]={}; };
constexpr int NB=18, TILES=96, COLS=32;
alignas(64) int8_t codes[TILES][NB][512];
alignas(64) int8_t act[NB][COLS][32];
float dsc[NB][COLS]; float wsc[TILES][NB][16];
float y[COLS][TILES*16];
template<int MODE>
void run() {
  for (int t=0;t<TILES;++t) for (int g=0; g<COLS/16; ++g) {
    alignas(64) int32_t sums[2][256];
    __m512 acc[16]; for (int c=0;c<16;++c) acc[c]=_mm512_setzero_ps();
    auto issue=[&](int b){ const int8_t* q=&act[b][g*16][0]; const int8_t* w=codes[t][b];
      if (MODE==2) return;
      if (b&1){ _tile_zero(1); _tile_loadd(3,q,32); _tile_loadd(5,w,64); _tile_dpbssd(1,3,5); _tile_stored(1,sums[1],64);} 
      else { _tile_zero(0); _tile_loadd(2,q,32); _tile_loadd(4,w,64); _tile_dpbssd(0,2,4); _tile_stored(0,sums[0],64);} };
    issue(0);
    for (int b=0;b<NB;++b){ if(b+1<NB) issue(b+1);
      if (MODE==1) continue;
      __m512 s0=_mm512_loadu_ps(wsc[t][b]);
      for(int c=0;c<16;++c){ __m512i s=_mm512_load_si512(sums[b&1]+c*16); acc[c]=_mm512_fmadd_ps(_mm512_cvtepi32_ps(s),_mm512_mul_ps(s0,_mm512_set1_ps(dsc[b][g*16+c])),acc[c]); }
    }
    for(int c=0;c<16;++c) _mm512_storeu_ps(&y[g*16+c][t*16], acc[c]);
  }
}
// 2x2: two tiles x two groups per block, accumulators in memory
void run22() {
  for (int t=0;t<TILES;t+=2) {
    alignas(64) int32_t sums[4][256];
    alignas(64) float acc[2][COLS][16]; memset(acc,0,sizeof acc);
    for (int b=0;b<NB;++b){
      _tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);
      _tile_loadd(4,&act[b][0][0],32); _tile_loadd(5,&act[b][16][0],32);
      _tile_loadd(6,codes[t][b],64); _tile_loadd(7,codes[t+1][b],64);
      _tile_dpbssd(0,4,6); _tile_dpbssd(1,5,6); _tile_dpbssd(2,4,7); _tile_dpbssd(3,5,7);
      _tile_stored(0,sums[0],64);_tile_stored(1,sums[1],64);_tile_stored(2,sums[2],64);_tile_stored(3,sums[3],64);
      for (int k=0;k<4;++k){ int tt=k>>1, g=k&1; __m512 s0=_mm512_loadu_ps(wsc[t+tt][b]);
        for(int c=0;c<16;++c){ __m512i s=_mm512_load_si512(sums[k]+c*16); __m512 a=_mm512_load_ps(acc[tt][g*16+c]);
          _mm512_store_ps(acc[tt][g*16+c], _mm512_fmadd_ps(_mm512_cvtepi32_ps(s),_mm512_mul_ps(s0,_mm512_set1_ps(dsc[b][g*16+c])),a)); } }
    }
    for(int tt=0;tt<2;++tt) for(int c=0;c<COLS;++c) _mm512_storeu_ps(&y[c][(t+tt)*16], _mm512_load_ps(acc[tt][c]));
  }
}
// one weight tile, both column groups per block (B shared), accumulators 32 (registers/spills)
void run2g() {
  for (int t=0;t<TILES;++t) {
    alignas(64) int32_t sums[2][256];
    __m512 acc[32]; for (int c=0;c<32;++c) acc[c]=_mm512_setzero_ps();
    for (int b=0;b<NB;++b){
      _tile_zero(0); _tile_zero(1);
      _tile_loadd(4,codes[t][b],64);
      _tile_loadd(2,&act[b][0][0],32); _tile_loadd(3,&act[b][16][0],32);
      _tile_dpbssd(0,2,4); _tile_dpbssd(1,3,4);
      _tile_stored(0,sums[0],64); _tile_stored(1,sums[1],64);
      __m512 s0=_mm512_loadu_ps(wsc[t][b]);
      for(int c=0;c<32;++c){ __m512i s=_mm512_load_si512(sums[c>>4]+(c&15)*16); acc[c]=_mm512_fmadd_ps(_mm512_cvtepi32_ps(s),_mm512_mul_ps(s0,_mm512_set1_ps(dsc[b][c])),acc[c]); }
    }
    for(int c=0;c<32;++c) _mm512_storeu_ps(&y[c][t*16], acc[c]);
  }
}
// two weight tiles, one group per block (A shared), pipelined one block ahead
void run2t() {
  for (int t=0;t<TILES;t+=2) for (int g=0; g<COLS/16; ++g) {
    alignas(64) int32_t sums[2][2][256];
    __m512 acc[32]; for (int c=0;c<32;++c) acc[c]=_mm512_setzero_ps();
    auto issue=[&](int b){ const int8_t* q=&act[b][g*16][0];
      if (b&1) { _tile_zero(6); _tile_zero(7); _tile_loadd(3,q,32); _tile_loadd(4,codes[t][b],64); _tile_loadd(5,codes[t+1][b],64);
        _tile_dpbssd(6,3,4); _tile_dpbssd(7,3,5); _tile_stored(6,sums[1][0],64); _tile_stored(7,sums[1][1],64);}
      else { _tile_zero(0); _tile_zero(1); _tile_loadd(2,q,32); _tile_loadd(4,codes[t][b],64); _tile_loadd(5,codes[t+1][b],64);
        _tile_dpbssd(0,2,4); _tile_dpbssd(1,2,5); _tile_stored(0,sums[0][0],64); _tile_stored(1,sums[0][1],64);} };
    issue(0);
    for (int b=0;b<NB;++b){ if (b+1<NB) issue(b+1);
      for (int k=0;k<2;++k){ __m512 s0=_mm512_loadu_ps(wsc[t+k][b]);
      for(int c=0;c<16;++c){ __m512i s=_mm512_load_si512(sums[b&1][k]+c*16); acc[k*16+c]=_mm512_fmadd_ps(_mm512_cvtepi32_ps(s),_mm512_mul_ps(s0,_mm512_set1_ps(dsc[b][g*16+c])),acc[k*16+c]); } }
    }
    for(int k=0;k<2;++k) for(int c=0;c<16;++c) _mm512_storeu_ps(&y[g*16+c][(t+k)*16], acc[k*16+c]);
  }
}
template<class F> double timeit(F f){ double best=1e9; for(int r=0;r<20;++r){auto t0=std::chrono::steady_clock::now(); for(int i=0;i<10;++i) f(); double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count()/10; if(s<best)best=s;} return best*1e3; }
int main(){ syscall(SYS_arch_prctl,0x1023,18);
  TileConfig c; for(int t: {0,1,2,3}){c.rows[t]=16;c.colsb[t]=64;}
  // for run(): 2,3 A (16x32) 4,5 B (8x64)
  TileConfig c1=c; c1.rows[2]=c1.rows[3]=16; c1.colsb[2]=c1.colsb[3]=32; c1.rows[4]=c1.rows[5]=8; c1.colsb[4]=c1.colsb[5]=64;
  TileConfig c2=c; c2.rows[4]=c2.rows[5]=16; c2.colsb[4]=c2.colsb[5]=32; c2.rows[6]=c2.rows[7]=8; c2.colsb[6]=c2.colsb[7]=64;
  memset(codes,3,sizeof codes); memset(act,1,sizeof act);
  _tile_loadconfig(&c1);
  printf("full     %.4f ms\n", timeit(run<0>));
  printf("tileonly %.4f ms\n", timeit(run<1>));
  printf("epionly  %.4f ms\n", timeit(run<2>));
  { TileConfig c3=c1; c3.rows[6]=c3.rows[7]=16; c3.colsb[6]=c3.colsb[7]=64; _tile_loadconfig(&c3);
  printf("2g       %.4f ms\n", timeit(run2g));
  printf("2t       %.4f ms\n", timeit(run2t)); }
  _tile_loadconfig(&c2);
  printf("2x2      %.4f ms\n", timeit(run22));
}
