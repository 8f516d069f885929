// What cuDNN's graph API offers for one of the fused path's convolutions, on a machine with no
// GPU: the operation graph of engine/src/fused/conv_graph.rs (conv -> +bias -> +residual -> ReLU,
// NHWC, f16 in and out, f32 in between), built without a handle, heuristics (mode A, then the
// fallback list) run against a device described in JSON (cuDNN >= 9.8 "deviceless" planning),
// and each engine configuration made into a plan. Prints each configuration's engine, numerical
// notes, behaviour notes, knobs with their ranges, and whether its plan finalized.
//
// Usage: run.sh [N C H] (see run.sh). Not part of CI: it needs the stand-in driver run.sh builds.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdbool.h>
#include <cudnn.h>
#define CK(x) do{cudnnStatus_t s_=(x); if(s_){printf("FAIL %s -> %s\n", #x, cudnnGetErrorString(s_)); char m[512]; cudnnGetLastErrorString(m,512); printf("   %s\n", m);} }while(0)
static cudnnBackendDescriptor_t mk(cudnnBackendDescriptorType_t t){cudnnBackendDescriptor_t d; CK(cudnnBackendCreateDescriptor(t,&d)); return d;}
static cudnnBackendDescriptor_t tensor(int64_t uid, int64_t n,int64_t c,int64_t h,int64_t w, cudnnDataType_t dt, bool virt){
  cudnnBackendDescriptor_t d=mk(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
  int64_t dims[4]={n,c,h,w}, str[4]={h*w*c,1,w*c,c}, al=16;
  CK(cudnnBackendSetAttribute(d,CUDNN_ATTR_TENSOR_DATA_TYPE,CUDNN_TYPE_DATA_TYPE,1,&dt));
  CK(cudnnBackendSetAttribute(d,CUDNN_ATTR_TENSOR_DIMENSIONS,CUDNN_TYPE_INT64,4,dims));
  CK(cudnnBackendSetAttribute(d,CUDNN_ATTR_TENSOR_STRIDES,CUDNN_TYPE_INT64,4,str));
  CK(cudnnBackendSetAttribute(d,CUDNN_ATTR_TENSOR_UNIQUE_ID,CUDNN_TYPE_INT64,1,&uid));
  CK(cudnnBackendSetAttribute(d,CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,CUDNN_TYPE_INT64,1,&al));
  CK(cudnnBackendSetAttribute(d,CUDNN_ATTR_TENSOR_IS_VIRTUAL,CUDNN_TYPE_BOOLEAN,1,&virt));
  CK(cudnnBackendFinalize(d)); return d;
}
static cudnnBackendDescriptor_t pw(cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t y){
  cudnnBackendDescriptor_t p=mk(CUDNN_BACKEND_POINTWISE_DESCRIPTOR); cudnnDataType_t f=CUDNN_DATA_FLOAT;
  CK(cudnnBackendSetAttribute(p,CUDNN_ATTR_POINTWISE_MODE,CUDNN_TYPE_POINTWISE_MODE,1,&mode));
  CK(cudnnBackendSetAttribute(p,CUDNN_ATTR_POINTWISE_MATH_PREC,CUDNN_TYPE_DATA_TYPE,1,&f));
  CK(cudnnBackendFinalize(p));
  cudnnBackendDescriptor_t o=mk(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
  CK(cudnnBackendSetAttribute(o,CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR,CUDNN_TYPE_BACKEND_DESCRIPTOR,1,&p));
  CK(cudnnBackendSetAttribute(o,CUDNN_ATTR_OPERATION_POINTWISE_XDESC,CUDNN_TYPE_BACKEND_DESCRIPTOR,1,&x));
  if(b) CK(cudnnBackendSetAttribute(o,CUDNN_ATTR_OPERATION_POINTWISE_BDESC,CUDNN_TYPE_BACKEND_DESCRIPTOR,1,&b));
  CK(cudnnBackendSetAttribute(o,CUDNN_ATTR_OPERATION_POINTWISE_YDESC,CUDNN_TYPE_BACKEND_DESCRIPTOR,1,&y));
  CK(cudnnBackendFinalize(o)); return o;
}
int main(int argc,char**argv){
  if(argc<5){fprintf(stderr,"usage: probe DEVICE.json N C H\n");return 2;}
  int64_t N=atoi(argv[2]), C=atoi(argv[3]), H=atoi(argv[4]), K=C; cudnnDataType_t dt=CUDNN_DATA_HALF;
  FILE*f=fopen(argv[1],"rb"); if(!f){perror(argv[1]);return 2;} char buf[8192]; size_t n=fread(buf,1,sizeof buf,f); fclose(f);
  cudnnBackendDescriptor_t dp=mk(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR);
  CK(cudnnBackendSetAttribute(dp,CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION,CUDNN_TYPE_CHAR,(int64_t)n,buf));
  CK(cudnnBackendFinalize(dp)); printf("deviceprop finalized\n");
  cudnnBackendDescriptor_t X=tensor(1,N,C,H,H,dt,false), W=tensor(2,K,C,3,3,dt,false), Y=tensor(3,N,K,H,H,dt,false);
  cudnnBackendDescriptor_t B=tensor(4,1,K,1,1,CUDNN_DATA_FLOAT,false), Z=tensor(5,N,K,H,H,dt,false);
  cudnnBackendDescriptor_t V1=tensor(100,N,K,H,H,CUDNN_DATA_FLOAT,true),V2=tensor(101,N,K,H,H,CUDNN_DATA_FLOAT,true),V3=tensor(102,N,K,H,H,CUDNN_DATA_FLOAT,true);
  cudnnBackendDescriptor_t cd=mk(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR); cudnnDataType_t fl=CUDNN_DATA_FLOAT; cudnnConvolutionMode_t cm=CUDNN_CROSS_CORRELATION;
  int64_t sd=2, one[2]={1,1}, pad[2]={1,1};
  CK(cudnnBackendSetAttribute(cd,CUDNN_ATTR_CONVOLUTION_COMP_TYPE,CUDNN_TYPE_DATA_TYPE,1,&fl));
  CK(cudnnBackendSetAttribute(cd,CUDNN_ATTR_CONVOLUTION_CONV_MODE,CUDNN_TYPE_CONVOLUTION_MODE,1,&cm));
  CK(cudnnBackendSetAttribute(cd,CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS,CUDNN_TYPE_INT64,1,&sd));
  CK(cudnnBackendSetAttribute(cd,CUDNN_ATTR_CONVOLUTION_DILATIONS,CUDNN_TYPE_INT64,2,one));
  CK(cudnnBackendSetAttribute(cd,CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,CUDNN_TYPE_INT64,2,one));
  CK(cudnnBackendSetAttribute(cd,CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS,CUDNN_TYPE_INT64,2,pad));
  CK(cudnnBackendSetAttribute(cd,CUDNN_ATTR_CONVOLUTION_POST_PADDINGS,CUDNN_TYPE_INT64,2,pad));
  CK(cudnnBackendFinalize(cd));
  cudnnBackendDescriptor_t cv=mk(CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR); float a=1,b0=0;
  CK(cudnnBackendSetAttribute(cv,CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X,CUDNN_TYPE_BACKEND_DESCRIPTOR,1,&X));
  CK(cudnnBackendSetAttribute(cv,CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,CUDNN_TYPE_BACKEND_DESCRIPTOR,1,&W));
  CK(cudnnBackendSetAttribute(cv,CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,CUDNN_TYPE_BACKEND_DESCRIPTOR,1,&V1));
  CK(cudnnBackendSetAttribute(cv,CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,CUDNN_TYPE_BACKEND_DESCRIPTOR,1,&cd));
  CK(cudnnBackendSetAttribute(cv,CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,CUDNN_TYPE_FLOAT,1,&a));
  CK(cudnnBackendSetAttribute(cv,CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,CUDNN_TYPE_FLOAT,1,&b0));
  CK(cudnnBackendFinalize(cv));
  cudnnBackendDescriptor_t ops[4]={cv, pw(CUDNN_POINTWISE_ADD,V1,B,V2), pw(CUDNN_POINTWISE_ADD,V2,Z,V3), pw(CUDNN_POINTWISE_RELU_FWD,V3,NULL,Y)};
  cudnnBackendDescriptor_t og=mk(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
  CK(cudnnBackendSetAttribute(og,CUDNN_ATTR_OPERATIONGRAPH_OPS,CUDNN_TYPE_BACKEND_DESCRIPTOR,4,ops));
  CK(cudnnBackendFinalize(og)); printf("opgraph finalized\n");
  int modes[2]={CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK};
  for(int mi=0;mi<2;mi++){
  cudnnBackendDescriptor_t he=mk(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR); cudnnBackendHeurMode_t hm=modes[mi];
  CK(cudnnBackendSetAttribute(he,CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH,CUDNN_TYPE_BACKEND_DESCRIPTOR,1,&og));
  CK(cudnnBackendSetAttribute(he,CUDNN_ATTR_ENGINEHEUR_MODE,CUDNN_TYPE_HEUR_MODE,1,&hm));
  CK(cudnnBackendSetAttribute(he,CUDNN_ATTR_ENGINEHEUR_DEVICEPROP,CUDNN_TYPE_BACKEND_DESCRIPTOR,1,&dp));
  CK(cudnnBackendFinalize(he));
  int64_t cnt=0; CK(cudnnBackendGetAttribute(he,CUDNN_ATTR_ENGINEHEUR_RESULTS,CUDNN_TYPE_BACKEND_DESCRIPTOR,0,&cnt,NULL));
  printf("mode %d: %ld engine configs\n", hm, (long)cnt);
  if(cnt>20)cnt=20;
  cudnnBackendDescriptor_t cfgs[64]; for(int i=0;i<cnt;i++) cfgs[i]=mk(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
  int64_t got=0; cudnnStatus_t gs=cudnnBackendGetAttribute(he,CUDNN_ATTR_ENGINEHEUR_RESULTS,CUDNN_TYPE_BACKEND_DESCRIPTOR,cnt,&got,cfgs); if(gs) printf("get results: %s\n", cudnnGetErrorString(gs));
  printf("  %ld finalized\n",(long)got); for(int i=0;i<got;i++){
    cudnnBackendDescriptor_t e=mk(CUDNN_BACKEND_ENGINE_DESCRIPTOR); int64_t g1=0;
    CK(cudnnBackendGetAttribute(cfgs[i],CUDNN_ATTR_ENGINECFG_ENGINE,CUDNN_TYPE_BACKEND_DESCRIPTOR,1,&g1,&e));
    int64_t gi=-1,g2; CK(cudnnBackendGetAttribute(e,CUDNN_ATTR_ENGINE_GLOBAL_INDEX,CUDNN_TYPE_INT64,1,&g2,&gi));
    unsigned notes[16]; int64_t nn=0; CK(cudnnBackendGetAttribute(e,CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,CUDNN_TYPE_NUMERICAL_NOTE,16,&nn,notes));
    unsigned beh[16]; int64_t nb=0; CK(cudnnBackendGetAttribute(e,CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE,CUDNN_TYPE_BEHAVIOR_NOTE,16,&nb,beh));
    cudnnBackendDescriptor_t ki[64]; for(int j=0;j<64;j++) ki[j]=mk(CUDNN_BACKEND_KNOB_INFO_DESCRIPTOR);
    int64_t nk=0; CK(cudnnBackendGetAttribute(e,CUDNN_ATTR_ENGINE_KNOB_INFO,CUDNN_TYPE_BACKEND_DESCRIPTOR,64,&nk,ki));
    printf("  cfg %d: engine %ld notes[",i,(long)gi); for(int j=0;j<nn;j++)printf("%u ",notes[j]); printf("] beh["); for(int j=0;j<nb;j++)printf("%u ",beh[j]); printf("] knobs:");
    for(int j=0;j<nk;j++){unsigned t; int64_t c1,mn,mx,st; CK(cudnnBackendGetAttribute(ki[j],CUDNN_ATTR_KNOB_INFO_TYPE,CUDNN_TYPE_KNOB_TYPE,1,&c1,&t));
      CK(cudnnBackendGetAttribute(ki[j],CUDNN_ATTR_KNOB_INFO_MINIMUM_VALUE,CUDNN_TYPE_INT64,1,&c1,&mn));CK(cudnnBackendGetAttribute(ki[j],CUDNN_ATTR_KNOB_INFO_MAXIMUM_VALUE,CUDNN_TYPE_INT64,1,&c1,&mx));CK(cudnnBackendGetAttribute(ki[j],CUDNN_ATTR_KNOB_INFO_STRIDE,CUDNN_TYPE_INT64,1,&c1,&st));
      printf(" %u[%ld..%ld/%ld]",t,(long)mn,(long)mx,(long)st);}
    cudnnBackendDescriptor_t kc[64]; for(int j=0;j<64;j++) kc[j]=mk(CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR);
    int64_t nc=0; CK(cudnnBackendGetAttribute(cfgs[i],CUDNN_ATTR_ENGINECFG_KNOB_CHOICES,CUDNN_TYPE_BACKEND_DESCRIPTOR,64,&nc,kc));
    printf("\n     chosen:"); for(int j=0;j<nc;j++){unsigned t; int64_t c1,v; CK(cudnnBackendGetAttribute(kc[j],CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE,CUDNN_TYPE_KNOB_TYPE,1,&c1,&t)); CK(cudnnBackendGetAttribute(kc[j],CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE,CUDNN_TYPE_INT64,1,&c1,&v)); printf(" %u=%ld",t,(long)v);}
    cudnnBackendDescriptor_t p=mk(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
    CK(cudnnBackendSetAttribute(p,CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG,CUDNN_TYPE_BACKEND_DESCRIPTOR,1,&cfgs[i]));
    cudnnStatus_t fs=cudnnBackendFinalize(p); int64_t ws=-1,g3;
    if(!fs) cudnnBackendGetAttribute(p,CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,CUDNN_TYPE_INT64,1,&g3,&ws);
    printf("\n     plan: %s ws=%ld\n", cudnnGetErrorString(fs),(long)ws);
    if(fs){char m[512]; cudnnGetLastErrorString(m,512); printf("     %s\n",m);}
  }}
  return 0;
}
